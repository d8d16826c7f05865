"""The dataset format both sides share (video decoding, schema, masks, versions)."""

"""Images: preparation of folders of JPEG/PNG into uint8 shards, the built-in photo
corpus, and patch masks (docs/data.md#image-corpora)."""

"""Speech data: preparation of wav/flac/ogg directories into 16 kHz sample shards
(``prepare``), the on-disk corpus (``corpus``), length-bucketed batches cropped to their
shortest utterance (``dataset``) and the built-in synthesised corpus (``builtin``)."""

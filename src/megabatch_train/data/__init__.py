"""The data a run trains and evaluates on. Start at `sources.py`: it turns a `--data` / `--eval-data` spec
into a training stream and an evaluation set (the types they share are in `types.py`). One module per
built-in source (`synthetic`, `digits`, `emoji`, `fashion`, `wordnet_pairs` over the reader `wordnet`);
users' CSV/TSV tables and webdataset shards are in `files/`; the tokenizers of the built-in text tower in
`tokenizer.py`."""

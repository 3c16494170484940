"""Users' files (`--data csv:PATH`, `--data wds:PATTERN`). `stream.py` is the training stream and the
evaluation sets over them, built from `loading.py`'s pieces; the readers are `tables.py` (CSV/TSV) and
`shards.py` (webdataset tar), with what both share (bad-item accounting, ids, RGB images) in `pairs.py`."""

"""Retrieval: a checkpoint's encoders at scale, the index they write, and search over it.

  pretrained.py     load_pretrained(path) -> Pretrained: jitted encode_* / similarity of any readable checkpoint
  model.py          load_model(path) -> RetrievalModel: a Pretrained (also from a training workdir) + the video
                    recipe of its original (frames, size, sampling, resize, text length)
  extraction.py     fixed-shape batched embedding extraction; device_encoder splits batches over local devices
  video_files.py    finding clips in a folder; one clip's test-time model input
  indexer.py        inputs -> parts -> index: every device and process, resumable (the library side of encode)
  windows.py        moments: a long video cut into overlapping windows (one row each: video, start, end), decoded once
  growth.py         a growing index: append new inputs, delete rows, both published atomically
  index.py          the index on disk: parts, memory-mapped embeddings, index.json, info; format 1 still opens
  string_table.py   seekable row names and captions
  exact.py          exact chunked top-k (argpartition per chunk, merged; ties by row)
  moments.py        windows ranked -> distinct moments (temporal NMS, per-video limit); R@k at IoU
  approximate.py    FAISS IVF (8-bit codes) candidates re-scored exactly; built with its measured recall
  search.py         Searcher: index + model loaded once, batched queries, backend choice
  thumbnails.py     a strip of frames per clip inside the index (written by encode), for the search page
  query_batcher.py  queries of concurrent requests answered by one model call per batch
  service.py        the FastAPI app: JSON API + the page in static/ (python -m clipvip_jax.serve)
  *_command.py      the commands python -m clipvip_jax.encode / .search / .index run
"""

"""Data stages: download (fetch, verify, extract), preprocess (split, shards), validate, corrupt (the robustness benchmark)."""

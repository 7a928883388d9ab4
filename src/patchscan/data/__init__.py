"""Dataset loaders: texts (file, JSONL, built-in, HF), LRE relations, entity lists."""

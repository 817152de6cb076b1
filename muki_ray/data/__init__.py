"""Text sources and the bucketed pool: `sources` reads the built-in datasets, JSONL, CSV, Parquet and
`save_to_disk` folders into Ray Datasets of {id, text[, label]}; `pool` checks the pool once and spreads
it over hash buckets of the id, with the bucket-by-bucket work (anti-join, join, digests).
"""

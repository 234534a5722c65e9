"""The CPU's continuous engine: the runner (:mod:`.engine`), its scheduling rule (:mod:`.scheduler`), the
shape buckets it packs calls into, its token pool and its captured calls.
"""

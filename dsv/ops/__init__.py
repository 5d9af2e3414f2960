from dsv.ops.sparse_attention import sparse_attention, sparse_attention_index  # noqa: F401

"""Compact block index: transposed lists against FlexAttention's, BlockMask round trips, random masks."""
import pytest
import torch

from dsv.ops.block_index import BlockIndex, random_block_index


def _index(seed: int, *, batch=2, heads=3, seq_len=1000, block=64, per_head=(0.02, 0.5, 1.0)) -> BlockIndex:
    generator = torch.Generator().manual_seed(seed)
    return random_block_index(batch, heads, seq_len, block, 0.0, generator=generator, per_head_density=per_head)


@pytest.mark.parametrize("seed", [0, 1])
def test_transpose_matches_flex_q_indices(seed):
    index = _index(seed)
    mask = index.to_block_mask()
    transposed = index.transpose()
    assert torch.equal(transposed.counts, mask.q_num_blocks)
    padded = transposed.to_padded(index.num_blocks)  # (B, H, NKV, NQ)
    valid = torch.arange(index.num_blocks) < mask.q_num_blocks[..., None]
    # FlexAttention leaves its padding unspecified: compare the valid prefix only
    assert torch.equal(torch.where(valid, padded, -1), torch.where(valid, mask.q_indices, -1))


def test_transpose_lists_are_the_query_blocks_that_selected_each_kv_block():
    index = _index(2, batch=1, heads=2, seq_len=300, block=32, per_head=(0.3, 0.7))
    dense = index.to_dense()  # (B, H, NQ, NKV)
    t = index.transpose()
    for h in range(2):
        for kv in range(index.num_blocks):
            start, count = int(t.offsets[0, h, kv]), int(t.counts[0, h, kv])
            expected = torch.nonzero(dense[0, h, :, kv]).flatten().to(torch.int32)
            assert torch.equal(t.q_blocks[0, h, start : start + count], expected)


def test_block_mask_round_trip():
    index = _index(3)
    back = BlockIndex.from_block_mask(index.to_block_mask(), seq_len=index.seq_len)
    assert torch.equal(back.counts, index.counts)
    assert torch.equal(back.indices, index.indices)


def test_from_block_mask_takes_the_union_of_partial_and_full_blocks():
    from torch.nn.attention.flex_attention import BlockMask

    partial = torch.tensor([[[[2, 0, 0], [1, 0, 0], [0, 0, 0]]]], dtype=torch.int32)
    full = torch.tensor([[[[0, 0, 0], [0, 0, 0], [1, 2, 0]]]], dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(
        torch.tensor([[[1, 1, 0]]], dtype=torch.int32), partial,
        torch.tensor([[[1, 0, 3]]], dtype=torch.int32), full, BLOCK_SIZE=16, seq_lengths=(40, 40),
    )
    index = BlockIndex.from_block_mask(mask, seq_len=40)
    assert index.counts.tolist() == [[[2, 1, 3]]]
    assert index.indices.tolist() == [[[[0, 2, 0], [1, 0, 0], [0, 1, 2]]]]


def test_from_block_mask_rejects_another_sequence_length():
    mask = _index(4, seq_len=640).to_block_mask()
    with pytest.raises(ValueError, match=r"\(Q_LEN, KV_LEN\) = \(640, 640\), but q, k, v have 1000 tokens"):
        BlockIndex.from_block_mask(mask, seq_len=1000)


def test_from_block_mask_rejects_a_mask_with_more_kv_blocks():
    from torch.nn.attention.flex_attention import BlockMask

    counts, wide = torch.ones(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 5, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(counts, wide, BLOCK_SIZE=16, seq_lengths=(40, 40))
    with pytest.raises(ValueError, match="BlockMask has 5 KV blocks of 16, but a sequence of 40 needs 3"):
        BlockIndex.from_block_mask(mask, seq_len=40)


def test_random_block_index_counts_diagonal_and_order():
    index = _index(5, per_head=(0.01, 0.25, 1.0))
    n = index.num_blocks  # 16 blocks of 64 for 1000 tokens
    assert index.counts[:, 0].eq(1).all() and index.counts[:, 1].eq(4).all() and index.counts[:, 2].eq(n).all()
    dense = index.to_dense()
    assert dense.diagonal(dim1=-2, dim2=-1).all()
    assert torch.equal(dense.sum(-1, dtype=torch.int32), index.counts)  # no duplicates
    width = torch.arange(index.indices.shape[-1])
    valid = width < index.counts[..., None]
    ascending = (index.indices[..., 1:] > index.indices[..., :-1]) | ~valid[..., 1:]
    assert ascending.all() and index.indices[~valid].eq(0).all()


def test_dense_round_trip_and_density():
    selected = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(6)) < 0.4
    selected |= torch.eye(7, dtype=torch.bool)
    index = BlockIndex.from_dense(selected, block_size=16, seq_len=100)
    assert torch.equal(index.to_dense(), selected)
    assert index.density() == pytest.approx(selected.float().mean().item())
    assert index.nbytes() == index.counts.numel() * 4 + index.indices.numel() * 4


def test_expand_broadcasts_batch_and_heads():
    index = _index(7, batch=1, heads=1, per_head=(0.3,))
    wide = index.expand(2, 3)
    assert wide.indices.shape[:2] == (2, 3) and torch.equal(wide.indices[1, 2], index.indices[0, 0])


def _token_mask(index):
    """(B, H, S, S) bool: which keys each query may attend to."""
    b = index.block_size
    dense = index.to_dense().repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)
    return dense[..., : index.seq_len, : index.seq_len]


@pytest.mark.parametrize("seq_len", [256, 250, 200, 130])
def test_halving_blocks_keeps_the_token_mask(seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    index = random_block_index(2, 3, seq_len, 64, 0.4, generator=generator, per_head_density=(0.2, 0.6, 1.0))
    halved = index.halve_blocks()
    assert halved.block_size == 32 and halved.num_blocks == -(-seq_len // 32)
    assert torch.equal(_token_mask(halved), _token_mask(index))
    valid = torch.arange(halved.indices.shape[-1]) < halved.counts[..., None]
    listed = torch.where(valid, halved.indices, -1)
    assert (listed.diff(dim=-1)[valid[..., 1:]] > 0).all(), "lists stay ascending"
    assert (halved.indices[valid] < halved.num_blocks).all()

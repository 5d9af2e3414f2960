"""The dispatcher picks dense where the measured table says sparse is not faster."""
import pytest

from dsv.sparse.dispatch import DispatchTable
from tests.sparse.helpers import micro_model_config, sparse_config


def _table() -> DispatchTable:
    # at 4k tokens sparse is slower at every density; at 16k faster up to 30% of blocks
    return DispatchTable(seq_lens=[4096, 16384], densities=[0.1, 0.3, 0.5],
                         dense_ms=[1.0, 10.0], sparse_ms=[[2.0, 4.0, 6.0], [2.0, 8.0, 12.5]])


def test_interpolates_and_clamps():
    table = _table()
    assert table.speedup(16384, 0.1) == pytest.approx(5.0)
    assert table.speedup(16384, 0.2) == pytest.approx((5.0 + 1.25) / 2)
    assert table.speedup(8192, 0.1) == pytest.approx((0.5 + 5.0) / 2)  # halfway in log2(seq_len)
    assert table.speedup(1 << 20, 0.01) == pytest.approx(5.0)  # clamped to the table's corner


def test_picks_dense_where_the_table_says_so():
    table = _table()
    assert not table.use_sparse(4096, 0.1)
    assert table.use_sparse(16384, 0.3)
    assert not table.use_sparse(16384, 0.5)


def test_backend_runs_a_layer_dense_where_the_table_says_so(tmp_path):
    import torch

    from dsv.sparse.backend import DSVAttention

    path = _table().to_json(tmp_path / "table.json")
    backend = DSVAttention(sparse_config(dispatch="table", dispatch_table=str(path)), micro_model_config(),
                           torch.device("cpu"))
    backend.schedule.stage = 2
    backend.budgets = torch.tensor([[0.1, 0.1], [0.5, 0.5]])  # layer 0 at 10%, layer 1 at 50%
    assert backend.layer_runs_sparse(0, 16384) and not backend.layer_runs_sparse(1, 16384)
    assert not backend.layer_runs_sparse(0, 4096)


def test_the_shipped_table_loads():
    table = DispatchTable.load()
    assert table.device and table.speedup(65536, 0.1) > 1.0

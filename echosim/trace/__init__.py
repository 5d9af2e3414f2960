"""Ex-situ tracing: run one rank's training step on one device under a fake process group.

    from echosim.trace import trace_roles

    def make_step(mesh: DeviceMesh) -> Callable[[], None]:
        ...  # build the model, shard it over the mesh (fully_shard), return the step
    traces = trace_roles(make_step, mesh_shape={"dp": 8}, roles=[list(range(8))])

Each role (a list of ranks that do identical work) is traced once, as its first rank, with
`backend="fake"` so that no peer is needed. With `fake_tensors=True` (the default) tensors
are FakeTensors: nothing is computed or allocated, so configurations that do not fit one
device trace anywhere, and durations come from the kernel-time model.
"""
from echosim.trace.fake_world import fake_world, mesh_groups, trace_roles
from echosim.trace.recorder import Recorder

__all__ = ["Recorder", "fake_world", "mesh_groups", "trace_roles"]

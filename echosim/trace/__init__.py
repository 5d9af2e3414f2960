"""Ex-situ tracing: run one rank's training step on one device under a fake process group.

    from echosim.trace import trace_roles

    def make_step(mesh: DeviceMesh) -> Callable[[], None]:
        ...  # build the model, shard it over the mesh (fully_shard), return the step
    traces = trace_roles(make_step, mesh_shape={"dp": 8}, roles=[list(range(8))])

Each role (a list of ranks that do identical work) is traced once, as its first rank, with
`backend="fake"` so that no peer is needed. With `fake_tensors=True` (the default) tensors
are FakeTensors: nothing is computed or allocated, so configurations that do not fit one
device trace anywhere, and durations come from the kernel-time model.

    world.py      the fake world: its process group and the names of its mesh groups
    tracing.py    the tracing loop (trace_roles)
    user_steps.py what ordinary steps need there: model.to() under fake tensors, torch DDP; no torch.compile
    recorder.py   one rank's step as an execution graph; collectives.py and flops.py describe its ops
    fills.py      real-looking outputs of fake collectives while compute is timed on real data
    timing.py     full-speed steps less what the fake collectives cost (FILL_CLOCK)
    fitting.py    a measured trace fitted to its full-speed step (fit_to_in_situ)
    host.py       the host's pace of a step
"""
from echosim.trace.recorder import Recorder
from echosim.trace.tracing import trace_roles
from echosim.trace.world import fake_world, mesh_groups

__all__ = ["Recorder", "fake_world", "mesh_groups", "trace_roles"]

"""A GPT training step under tensor x pipeline x data parallelism, as one trace per stage.

Ranks are laid out as Megatron lays them out, tensor-parallel fastest, then data, then pipeline:
rank = (stage * dp + d) * tp + t, so a tensor-parallel group sits inside a node. Every rank of a
stage does the same work on its own shard, so one trace stands for all tp x dp ranks of a stage
and `predict(..., as_classes=True)` (echosim.simulator) replays one representative per stage.

Per stage: layers / pp layers (+ the embedding on the first, the head on the last), the
microbatches ordered by the pipeline schedule (echosim.pipeline). Without sequence parallelism
every TP rank holds the whole (S, B, H) activation between stages, and Megatron
(`scatter_gather_tensors_in_pipeline`, on by default; megatron/p2p_communication.py) sends each
rank's 1/t slice of it (`split_tensor_into_1d_equal_chunks`) to the same TP rank of the next
stage, which all-gathers the slices over TP (`gather_split_1d_tensor`); gradients going back
likewise. Under SP the activation is split over the sequence already and travels as it is.
Then data parallelism:

    ddp   gradients (fp32) all-reduced over dp in buckets of `bucket_mb`, each launched as soon as
          the last microbatch's backward has produced its layers (Megatron's overlapped reduce)
    fsdp  each part's bf16 weights all-gathered over dp before the first microbatch and kept for
          the step (torchtitan's choice under PP), gradients reduce-scattered per part in the last
          backward; the optimizer updates 1/dp of the master weights
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from echosim.graph import Trace
from echosim.pipeline import SCHEDULES, GraphBuilder, compose_pipeline
from echosim.trace.gpt import GPT_PRESETS, RECOMPUTE, GPTConfig, GPTParts, TracedPart, trace_gpt_parts

DATA_PARALLEL = ("ddp", "fsdp")
GRAD_BYTES = 4  # gradients are reduced in fp32 (Megatron's main_grad)
PARAM_BYTES = 2  # bf16 working weights


@dataclass(kw_only=True)
class GPTJob:
    """One GPT training configuration: model, parallelism, batch."""

    model: str = field(default="gpt-175b", metadata={
        "help": f"GPT preset: {', '.join(GPT_PRESETS)}; the model flags below override its sizes"})
    layers: int | None = field(default=None, metadata={"help": "transformer layers (None: the preset's)"})
    hidden: int | None = field(default=None, metadata={"help": "hidden size (None: the preset's)"})
    heads: int | None = field(default=None, metadata={"help": "attention heads (None: the preset's)"})
    ffn_hidden: int | None = field(default=None, metadata={"help": "MLP width (None: the preset's, 4 x hidden)"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sample (None: the preset's)"})
    vocab: int | None = field(default=None, metadata={"help": "vocabulary, padded (None: the preset's)"})
    recompute: str = field(default="none", metadata={
        "help": f"activation recomputation, Megatron's: one of {RECOMPUTE} (selective: the attention core; "
                f"full: every layer)"})
    tp: int = field(default=8, metadata={"help": "tensor-parallel degree"})
    pp: int = field(default=16, metadata={"help": "pipeline stages"})
    dp: int = field(default=8, metadata={"help": "data-parallel degree"})
    sequence_parallel: bool = field(default=True, metadata={"help": "Megatron sequence parallelism with TP"})
    data_parallel: str = field(default="ddp", metadata={"help": f"one of {DATA_PARALLEL}"})
    schedule: str = field(default="1f1b", metadata={"help": f"pipeline schedule: one of {SCHEDULES}"})
    micro_batch: int = field(default=1, metadata={"help": "samples per microbatch"})
    global_batch: int = field(default=1536, metadata={"help": "samples per step over all replicas"})
    bucket_mb: float = field(default=25.0, metadata={"help": "DDP gradient bucket size in MiB"})
    virtual_stages: int = field(default=1, metadata={
        "help": "model chunks per pipeline rank: interleaved 1F1B when > 1 (schedule 1f1b)"})

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def config(self) -> GPTConfig:
        """The preset `model`, with the sizes this job sets instead."""
        if self.model not in GPT_PRESETS:
            raise ValueError(f"GPT model {self.model!r} is not one of the presets {', '.join(GPT_PRESETS)}; "
                             f"describe another with layers, hidden, heads, ffn_hidden, seq_len and vocab")
        sizes = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn_hidden": self.ffn_hidden,
                 "seq": self.seq_len, "vocab": self.vocab}
        return replace(GPT_PRESETS[self.model](), **{k: v for k, v in sizes.items() if v is not None})

    def problems(self) -> list[str]:
        """Why this configuration cannot run the model (empty when it can)."""
        cfg, out = self.config(), []
        if cfg.hidden % cfg.heads:
            out.append(f"the heads ({cfg.heads}) do not divide the hidden size ({cfg.hidden})")
        if self.recompute not in RECOMPUTE:
            out.append(f"recompute {self.recompute!r} is not one of {RECOMPUTE}")
        if self.data_parallel not in DATA_PARALLEL:
            out.append(f"data parallelism {self.data_parallel!r} is not one of {DATA_PARALLEL}")
        if self.schedule not in SCHEDULES:
            out.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        for what, n in (("heads", cfg.heads), ("hidden size", cfg.hidden), ("MLP width", cfg.ffn),
                        ("vocabulary", cfg.vocab)):
            if n % self.tp:
                out.append(f"tp={self.tp} does not divide the {what} ({n})")
        if self.sequence_parallel and cfg.seq % self.tp:
            out.append(f"tp={self.tp} does not divide the sequence ({cfg.seq}) under sequence parallelism")
        if cfg.layers % (self.pp * self.virtual_stages):
            chunks = f"pp={self.pp}" if self.virtual_stages == 1 else \
                f"pp x virtual stages = {self.pp} x {self.virtual_stages}"
            out.append(f"{chunks} does not divide the {cfg.layers} layers")
        if self.virtual_stages > 1 and self.schedule != "1f1b":
            out.append(f"virtual stages ({self.virtual_stages}) interleave the 1f1b schedule, not {self.schedule!r}")
        if self.virtual_stages > 1 and self.microbatches % self.pp:
            out.append(f"interleaved 1F1B needs the microbatches ({self.microbatches}) to be a multiple of "
                       f"pp ({self.pp})")
        if self.global_batch % (self.dp * self.micro_batch):
            out.append(f"dp x micro-batch = {self.dp} x {self.micro_batch} does not divide the global batch "
                       f"({self.global_batch})")
        return out

    def problem_message(self, problems: list[str]) -> str:
        return f"{self.model} on tp={self.tp} pp={self.pp} dp={self.dp}: " + "; ".join(problems)

    def check(self) -> None:
        """Raise ValueError naming every reason this configuration cannot run its model."""
        problems = self.problems()
        if problems:
            raise ValueError(self.problem_message(problems))

    def parts(self, *, device: str = "cpu", measure: bool = False) -> GPTParts:
        """The traced parts (see trace_gpt_parts for `device` and `measure`)."""
        shards = self.dp if self.data_parallel == "fsdp" else 1
        return trace_gpt_parts(self.config(), tp=self.tp, sequence_parallel=self.sequence_parallel,
                               micro_batch=self.micro_batch, optimizer_shards=shards, device=device, measure=measure,
                               recompute=self.recompute)

    def stage_parts(self, stage: int, *, device: str = "cpu", measure: bool = False) -> list[tuple[str, TracedPart]]:
        """The parts on `stage` (all its model chunks), in forward order."""
        return [named for chunk in range(self.virtual_stages)
                for named in self.chunk_parts(stage, chunk, device=device, measure=measure)]

    def chunk_parts(self, stage: int, chunk: int, *, device: str = "cpu",
                    measure: bool = False) -> list[tuple[str, TracedPart]]:
        """The parts of virtual stage chunk * pp + stage, in forward order."""
        parts = self.parts(device=device, measure=measure)
        virtual, last = chunk * self.pp + stage, self.pp * self.virtual_stages - 1
        per_chunk = self.layers_per_stage // self.virtual_stages
        names = [("embedding", parts.embedding)] if virtual == 0 else []
        names += [(f"layer{virtual * per_chunk + i}", parts.layer) for i in range(per_chunk)]
        return names + ([("head", parts.head)] if virtual == last else [])

    @property
    def layers_per_stage(self) -> int:
        return self.config().layers // self.pp

    def activation_bytes(self) -> float:
        """The activation between stages per microbatch on one rank: (S or S/t under SP, B, H) in bf16."""
        cfg = self.config()
        seq = cfg.seq // self.tp if self.sequence_parallel and self.tp > 1 else cfg.seq
        return float(seq * self.micro_batch * cfg.hidden * PARAM_BYTES)

    @property
    def scatter_gather(self) -> bool:
        """Whether pipeline messages are split over the TP ranks (Megatron's
        scatter_gather_tensors_in_pipeline, on by default, off under SP: the activation is split already)."""
        return self.tp > 1 and not self.sequence_parallel

    def message_bytes(self) -> float:
        """What one rank sends to its peer in the next (or previous) stage per microbatch."""
        return self.activation_bytes() / self.tp if self.scatter_gather else self.activation_bytes()

    def groups(self) -> dict[str, list[list[int]]]:
        tp, dp, pp = self.tp, self.dp, self.pp

        def rank(s: int, d: int, t: int) -> int:
            return (s * dp + d) * tp + t

        return {"tp": [[rank(s, d, t) for t in range(tp)] for s in range(pp) for d in range(dp)],
                "dp": [[rank(s, d, t) for d in range(dp)] for s in range(pp) for t in range(tp)],
                "pp": [[rank(s, d, t) for s in range(pp)] for d in range(dp) for t in range(tp)]}


@dataclass(kw_only=True)
class GPTStage:
    """One pipeline stage's work (echosim.pipeline.StageWork) with its data-parallel traffic."""

    job: GPTJob
    parts: list[tuple[str, TracedPart]]
    activation_bytes: float  # what one rank sends its peer stage: its slice when scattered over TP
    _synced: list[int] = field(default_factory=list)  # gradient-reduction nodes of the last backward

    def unpack(self, graph: GraphBuilder, received: int) -> int:
        if not self.job.scatter_gather:
            return received
        return graph.comm(kind="COMM_COLL", name="all_gather", stream="comm", group="tp",
                          nbytes=self.job.activation_bytes(), deps=[received])

    def forward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        gather = self.job.data_parallel == "fsdp" and self.job.dp > 1 and microbatch == 0
        last = after
        for _, part in self.parts:
            weights = [graph.comm(kind="COMM_COLL", name="all_gather", stream="dp_param", group="dp",
                                  nbytes=part.params * PARAM_BYTES)] if gather else []
            last = [graph.add(part.forward, after=last + weights)[-1]]
        return last[0]

    def backward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        final = microbatch == self.job.microbatches - 1 and self.job.dp > 1
        bucket_bytes, pending = self.job.bucket_mb * 2**20, 0.0
        last = after
        for _, part in reversed(self.parts):
            last = [graph.add(part.backward, after=last)[-1]]
            if not final:
                continue
            if self.job.data_parallel == "fsdp":
                self._synced.append(graph.comm(kind="COMM_COLL", name="reduce_scatter", stream="dp_grad", group="dp",
                                               nbytes=part.params * GRAD_BYTES, deps=last))
                continue
            pending += part.params * GRAD_BYTES
            if pending >= bucket_bytes:
                self._synced += self._all_reduce(graph, pending, bucket_bytes, last)
                pending = 0.0
        if final and pending:
            self._synced += self._all_reduce(graph, pending, bucket_bytes, last)
        return last[0]

    def _all_reduce(self, graph: GraphBuilder, nbytes: float, bucket_bytes: float, deps: list[int]) -> list[int]:
        """Buckets of at most `bucket_bytes` covering `nbytes` of ready gradients."""
        ids = []
        while nbytes > 0:
            size = min(nbytes, bucket_bytes)
            ids.append(graph.comm(kind="COMM_COLL", name="all_reduce", stream="dp_grad", group="dp", nbytes=size,
                                  deps=deps))
            nbytes -= size
        return ids

    def finish(self, graph: GraphBuilder, after: list[int]) -> None:
        after = after + self._synced[-1:]  # the reductions share one stream: the last one ends last
        for _, part in self.parts:
            graph.add(part.optimizer, after=after)


def gpt_traces(job: GPTJob, *, device: str = "cpu", measure: bool = False) -> list[Trace]:
    """One trace per pipeline stage, standing for its tp x dp ranks; raises ValueError if `job`
    cannot run its model. Parts are traced on fake `device` tensors, or timed on this GPU with
    `measure` (echosim.trace.gpt.trace_gpt_parts)."""
    job.check()
    per_stage = job.tp * job.dp
    stages = [[GPTStage(job=job, parts=job.chunk_parts(s, c, device=device, measure=measure),
                        activation_bytes=job.message_bytes()) for c in range(job.virtual_stages)]
              for s in range(job.pp)]
    return compose_pipeline(stages, schedule=job.schedule, microbatches=job.microbatches,
                            world_size=job.world_size, groups=job.groups(),
                            stage_ranks=[list(range(s * per_stage, (s + 1) * per_stage)) for s in range(job.pp)],
                            meta={"workload": "gpt", "model": job.model, "tp": job.tp, "pp": job.pp, "dp": job.dp,
                                  "virtual_stages": job.virtual_stages, "recompute": job.recompute,
                                  "sequence_parallel": job.sequence_parallel, "data_parallel": job.data_parallel})

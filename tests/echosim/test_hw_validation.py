"""Hardware files are checked field by field on load; where a name is looked up; relative GPU paths."""
import json

import pytest

from echosim.hw import HW_DIR, Cluster, Protocol, load_cluster, load_gpu, locate
from echosim.overlap import ConstantSlowdown, load_overlap


def shipped(name: str) -> dict:
    return json.loads((HW_DIR / f"{name}.json").read_text())


def written(tmp_path, data: dict, name: str = "mine.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def edited(data: dict, dotted: str, value) -> dict:
    """`data` with the field at a dotted path set to `value` (or removed, for DELETE)."""
    *parents, last = dotted.split(".")
    inner = data
    for key in parents:
        inner = inner[key]
    if value is DELETE:
        del inner[last]
    else:
        inner[last] = value
    return data


DELETE = object()

CLUSTER_FAULTS = [  # (field, bad value, what the one line must say)
    ("nvlink_GBps", -450, "nvlink_GBps must be a number > 0, got -450"),
    ("nvlink_GBps", 0, "nvlink_GBps must be a number > 0, got 0"),
    ("nvlink_GBps", "fast", "nvlink_GBps must be a number > 0, got 'fast'"),
    ("nic_Gbps", None, "nic_Gbps must be a number > 0, got None"),
    ("gpus_per_node", 0, "gpus_per_node must be an integer >= 1, got 0"),
    ("gpus_per_node", 7.5, "gpus_per_node must be an integer >= 1, got 7.5"),
    ("gpus_per_node", True, "gpus_per_node must be an integer >= 1, got True"),
    ("protocols.LL.base_us", -1.0, "protocols.LL.base_us must be a number >= 0, got -1.0"),
    ("protocols.Simple.bw_fraction", 1.5, "protocols.Simple.bw_fraction must be a number in (0, 1], got 1.5"),
    ("protocols.LL128.net_step_us", "4", "protocols.LL128.net_step_us must be a number >= 0, got '4'"),
    ("protocols.LL.nvlink_step_us", DELETE, "protocols.LL: missing fields ['nvlink_step_us']"),
    ("protocols.LL.latency_us", 1.0, "protocols.LL: unknown fields ['latency_us']"),
    ("protocols", {}, "protocols must name at least one NCCL protocol"),
    ("protocols", [], "protocols must be an object, got list"),
    ("collective_bw", {"all_gather@4": -1.0}, "collective_bw.all_gather@4 must be a number > 0, got -1.0"),
    ("collective_bw", {"all_gather": 1.0}, "collective_bw.all_gather must be keyed <collective>@<GPUs>"),
    ("tables", {"all_gather@2": [[1024, -5.0], [2048, 6.0]]},
     "tables.all_gather@2[0][1] must be a number > 0, got -5.0"),
    ("tables", {"all_gather@2": [[1024, 5.0, 1.0]]}, "tables.all_gather@2 must hold [bytes, us] rows"),
    ("tables", {"all_gather@2": [[2048, 5.0], [1024, 6.0]]}, "tables.all_gather@2 must list sizes in increasing"),
    ("collective_host_us", float("nan"), "collective_host_us must be a number >= 0, got nan"),
    ("measured", "yes", "measured must be true or false, got 'yes'"),
    ("gpu", 200, "gpu must be a string, got 200"),
    ("nvlink_GBps", DELETE, "missing fields ['nvlink_GBps']"),
    ("nvlnk_GBps", 450, "unknown fields ['nvlnk_GBps']"),
    ("nics_per_node", -1, "nics_per_node must be an integer >= 0, got -1"),
    ("nics_per_node", 2.5, "nics_per_node must be an integer >= 0, got 2.5"),
    ("network.oversubscription", 0.5, "network.oversubscription must be a number >= 1, got 0.5"),
    ("network.oversubscription", "2:1", "network.oversubscription must be a number >= 1, got '2:1'"),
    ("network.leaf_nodes", -32, "network.leaf_nodes must be an integer >= 0, got -32"),
    ("network.spine_nodes", 4, "network: unknown fields ['spine_nodes']"),
    ("network", 32, "network: expected a JSON object of Network fields, got 32"),
    ("sources.nvlink", "datasheet", "sources.nvlink names no field (one of ['name', 'gpu',"),
    ("sources.nic_Gbps", 400, "sources.nic_Gbps must be a string, got 400"),
]


@pytest.mark.parametrize("dotted, value, message", CLUSTER_FAULTS)
def test_every_malformed_cluster_field_is_one_line_naming_file_and_field(tmp_path, dotted, value, message):
    path = written(tmp_path, edited(shipped("dgx_h100"), dotted, value))
    with pytest.raises(ValueError) as err:
        load_cluster(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text


GPU_FAULTS = [
    ("hbm_GBps", -3350, "hbm_GBps must be a number > 0, got -3350"),
    ("peak_tflops.bfloat16", 0, "peak_tflops.bfloat16 must be a number > 0, got 0"),
    ("peak_tflops.float32", DELETE, "peak_tflops must give float32"),
    ("efficiency.gemm", -0.5, "efficiency.gemm must be a number in (0, 1], got -0.5"),
    ("efficiency.attention", DELETE, "efficiency must give every op class ['gemm', 'attention', 'memory']"),
    ("launch_us", -2.0, "launch_us must be a number >= 0, got -2.0"),
    ("memory_GB", "80", "memory_GB must be a number >= 0, got '80'"),
    ("kernels", {"aten.mm|2x2,2x2|bfloat16": -1.0}, "kernels.aten.mm|2x2,2x2|bfloat16 must be a number >= 0"),
    ("host_launch_us", {"gemm": -4.0}, "host_launch_us.gemm must be a number >= 0, got -4.0"),
    ("host_launch_us", {"gem": 4.0}, "host_launch_us has unknown kinds ['gem']"),
    ("measured", DELETE, "missing fields ['measured']"),
    ("peak_tflop", {}, "unknown fields ['peak_tflop']"),
    ("sources.peaks", "datasheet", "sources.peaks names no field (one of ['name', 'measured', 'peak_tflops',"),
    ("sources.efficiency", 0.58, "sources.efficiency must be a string, got 0.58"),
    ("sources", ["datasheet"], "sources must be an object, got list"),
]


@pytest.mark.parametrize("dotted, value, message", GPU_FAULTS)
def test_every_malformed_gpu_field_is_one_line_naming_file_and_field(tmp_path, dotted, value, message):
    path = written(tmp_path, edited(shipped("h100"), dotted, value))
    with pytest.raises(ValueError) as err:
        load_gpu(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text


OVERLAP_FAULTS = [
    ("default", 0.5, "default must be a number >= 1, got 0.5"),
    ("terms.gemm.large", [1.2], "terms.gemm.large must be [a, b], got [1.2]"),
    ("terms.gemm.large", [1.2, "x"], "terms.gemm.large[1] must be a number, got 'x'"),
    ("terms.gemm.huge", [1.2, 0.0], "terms.gemm.huge is not a size class ['small', 'large']"),
    ("terms.gemms", {}, "terms.gemms is not an op class"),
    ("terms", DELETE, "missing fields ['terms']"),
    ("slowdown", 2.0, "unknown fields ['slowdown']"),
]


@pytest.mark.parametrize("dotted, value, message", OVERLAP_FAULTS)
def test_every_malformed_overlap_field_is_one_line_naming_file_and_field(tmp_path, dotted, value, message):
    path = written(tmp_path, edited(shipped("overlap_h200"), dotted, value))
    with pytest.raises(ValueError) as err:
        load_overlap(str(path))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text


SEEDS = {"a100_80gb": "dgx_a100", "h100": "dgx_h100", "h200_datasheet": "dgx_h200_datasheet", "b200": "dgx_b200"}


@pytest.mark.parametrize("gpu, cluster", SEEDS.items())
def test_datasheet_seeds_say_so_and_where_each_number_comes_from(gpu, cluster):
    profile, node = load_gpu(gpu), load_cluster(cluster)
    assert node.gpu == gpu and not profile.measured and not node.measured
    assert {"peak_tflops", "hbm_GBps", "memory_GB", "efficiency", "launch_us"} <= set(profile.sources)
    assert {"nvlink_GBps", "nic_Gbps", "nics_per_node", "network", "protocols"} <= set(node.sources)
    assert profile.sources["peak_tflops"].startswith("NVIDIA") and "datasheet" in node.sources["nvlink_GBps"]
    assert profile.notes.startswith(("Datasheet seed, not measured", "Seed, not measured"))
    assert node.gpus_per_node == 8 and node.nics_per_node == 8 and profile.memory_GB > 0


def test_measured_h200_files_are_marked_measured():
    assert load_gpu("h200").measured and load_cluster("dgx_h200").measured
    assert load_cluster("dgx_h200").network.leaf_nodes == 0  # written before tiers: one flat tier


@pytest.mark.parametrize("spec", ["0.5", "-1", "0", "nan", "inf"])
def test_constant_overlap_factors_below_one_are_refused(spec):
    with pytest.raises(ValueError, match=f"overlap factor {spec}: .* must be a number >= 1"):
        load_overlap(spec)
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        ConstantSlowdown(factor=0.5)


def test_clusters_built_in_python_are_checked_too():
    simple = Protocol(base_us=10, nvlink_step_us=1, net_step_us=5, bw_fraction=1.0)
    with pytest.raises(ValueError, match="Cluster: nvlink_GBps must be a number > 0, got -100"):
        Cluster(name="toy", gpu="h100", gpus_per_node=8, nvlink_GBps=-100, nic_Gbps=200, protocols={"Simple": simple})
    with pytest.raises(ValueError, match=r"Protocol: bw_fraction must be a number in \(0, 1\], got -1"):
        Protocol(base_us=10, nvlink_step_us=1, net_step_us=5, bw_fraction=-1)


def test_malformed_json_and_a_non_object_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match=f"{path}: malformed JSON"):
        load_cluster(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: expected a JSON object of Cluster fields, got list"):
        load_cluster(path)


def test_relative_gpu_path_is_resolved_from_the_cluster_files_folder(tmp_path, monkeypatch):
    (tmp_path / "gpus").mkdir()
    (tmp_path / "clusters").mkdir()
    gpu = edited(shipped("h100"), "launch_us", 3.25)
    (tmp_path / "gpus" / "mygpu.json").write_text(json.dumps(gpu))
    cluster = written(tmp_path / "clusters", edited(shipped("dgx_h100"), "gpu", "../gpus/mygpu.json"))
    monkeypatch.chdir(tmp_path / "gpus")  # the path would resolve to nothing from here
    loaded = load_cluster(cluster)
    assert load_gpu(loaded.gpu).launch_us == 3.25
    missing = written(tmp_path / "clusters", edited(shipped("dgx_h100"), "gpu", "nowhere.json"), "other.json")
    with pytest.raises(FileNotFoundError, match=f"{missing}: gpu: no GPU profile .*nowhere.json"):
        load_cluster(missing)


def test_a_name_is_found_in_the_user_folder_before_the_shipped_files(user_folder):
    assert locate("dgx_h200", "cluster") == HW_DIR / "dgx_h200.json"
    user_folder.mkdir(parents=True)
    written(user_folder, edited(shipped("dgx_h200"), "collective_host_us", 123.0), "dgx_h200.json")
    assert locate("dgx_h200", "cluster") == user_folder / "dgx_h200.json"
    assert load_cluster("dgx_h200").collective_host_us == 123.0
    with pytest.raises(FileNotFoundError, match=f"no cluster 'dgx_z9': not a file, not in {user_folder}, and not one"):
        load_cluster("dgx_z9")

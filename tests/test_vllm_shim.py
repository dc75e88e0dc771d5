"""Unedited vLLM scripts on perfxlm (perfxlm/vllm_shim): `perfxlm run`, the PYTHONPATH switch,
the `vllm` module table, and vLLM's own SamplingParams coerced into perfxlm's."""

import dataclasses
import enum
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import perfxlm
from perfxlm.exceptions import VLLMValidationError
from perfxlm.vllm_shim import coerce_sampling_params, finder, install, is_installed, site_dir, uninstall

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "vllm_scripts"
SITE = str(site_dir())


def _env(switch: bool) -> dict[str, str]:
    """The test's environment (graph cache included), a small KV cache, and PYTHONPATH with or
    without the switch (the repo root too, so perfxlm imports without an install)."""
    env = dict(os.environ, PERFXLM_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE]
    env["PYTHONPATH"] = os.pathsep.join(([SITE] if switch else []) + [str(REPO), *rest])
    return env


def _python(args: list[str], *, switch: bool = False, cwd: Path = REPO, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env or _env(switch), capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _perfxlm_run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return _python(["-m", "perfxlm.cli", "run", *args], **kw)


@pytest.fixture
def shim():
    """The alias installed in this process for one test, then removed with the modules it made."""
    assert not is_installed()
    install()
    yield importlib.import_module("vllm")
    uninstall()
    assert not is_installed() and "vllm" not in sys.modules


# ---- unedited scripts, in subprocesses ---------------------------------------------------------

def test_basic_example_through_run_and_switch_matches_perfxlm(tmp_path):
    """vLLM's basic.py, unedited, through `perfxlm run` and through `PYTHONPATH=<site> python`,
    prints what the same script prints with its import changed to perfxlm (greedy)."""
    direct = tmp_path / "basic_perfxlm.py"
    source = (SCRIPTS / "basic.py").read_text()
    assert "from vllm import LLM, SamplingParams" in source
    direct.write_text(source.replace("from vllm import", "from perfxlm import"))
    expected = _python([str(direct)]).stdout
    assert expected.count("Prompt:") == 4 and "Output:    ''" not in expected
    assert _perfxlm_run([str(SCRIPTS / "basic.py")]).stdout == expected
    assert _python([str(SCRIPTS / "basic.py")], switch=True).stdout == expected


def test_chat_script_through_run_and_python_m():
    """A vLLM chat script (FlexibleArgumentParser from vllm.utils.argparse_utils, EngineArgs'
    flags, `LLM(**args)`, `llm.chat`) unedited through `perfxlm run` and, as a module, through
    `python -m` under the switch: the same greedy replies, with flags vLLM spells with underscores."""
    flags = ["--max-tokens", "8", "--temperature", "0", "--max_model_len", "512"]
    via_run = _perfxlm_run([str(SCRIPTS / "chat.py"), *flags]).stdout
    assert via_run.count("Generated text:") == 3 and "Generated text: ''" not in via_run
    via_switch = _python(["-m", "chat", *flags], switch=True, cwd=SCRIPTS).stdout
    assert via_switch == via_run


def test_subprocesses_inherit_the_switch(tmp_path):
    """A script under `perfxlm run` that starts another Python gets the alias there too, and that
    child (a `python -m` module) sees perfxlm's classes under vLLM's paths."""
    (tmp_path / "child.py").write_text(
        "import perfxlm, vllm\nfrom vllm.sampling_params import SamplingParams\n"
        "print(vllm.__version__, SamplingParams is perfxlm.SamplingParams)\n")
    parent = tmp_path / "parent.py"
    parent.write_text("import subprocess, sys\n"
                      "subprocess.run([sys.executable, '-m', 'child'], check=True)\n")
    out = _perfxlm_run([str(parent)], cwd=tmp_path).stdout
    assert out.strip() == "0.32.0 True"


def test_run_sets_argv_main_and_path_like_python(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\nsys.exit(3)\n")
    proc = _perfxlm_run([str(script), "--flag", "x"], check=False)
    assert proc.returncode == 3
    assert proc.stdout.strip() == f"__main__ {[str(script), '--flag', 'x']} {tmp_path}"
    module = _perfxlm_run(["-m", "show", "a"], cwd=tmp_path, check=False)
    assert module.returncode == 3 and f"__main__ {[str(script), 'a']}" in module.stdout
    missing = _perfxlm_run([str(tmp_path / "nope.py")], check=False)
    assert missing.returncode == 1 and "nope.py" in missing.stderr and "No such file" in missing.stderr
    usage = _perfxlm_run([], check=False)
    assert usage.returncode == 2 and "perfxlm run script.py" in usage.stderr


def test_path_flag_prints_the_sitecustomize_dir():
    out = _python(["-m", "perfxlm.vllm_shim", "--path"]).stdout.strip()
    assert Path(out) == Path(SITE) and sorted(p.name for p in Path(out).glob("*.py")) == ["sitecustomize.py"]


def test_switch_keeps_an_existing_sitecustomize(tmp_path):
    """The switch's sitecustomize shadows the one further down the path; that one still runs."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.stdout.write('theirs ran\\n')\n")
    env = _env(switch=True)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    out = _python(["-c", "import vllm; print(vllm.__version__)"], env=env).stdout
    assert out.split() == ["theirs", "ran", "0.32.0"]


def test_without_the_switch_perfxlm_provides_no_vllm():
    """Importing all of perfxlm's entry points installs nothing: `import vllm` then fails, or
    finds a real vLLM that is not perfxlm."""
    code = ("import perfxlm, perfxlm.cli, perfxlm.vllm_shim, perfxlm.vllm_shim.runner, sys\n"
            "assert not perfxlm.vllm_shim.is_installed()\n"
            "try:\n    import vllm\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
            "else:\n    print('found', vllm.__file__)\n")
    out = _python(["-c", code]).stdout.split()
    assert out == ["absent", "vllm"] or (out[0] == "found" and str(REPO / "perfxlm") not in out[1])


# ---- the module table, in this process ---------------------------------------------------------

def test_vllm_paths_give_perfxlm_objects(shim):
    import vllm.engine.arg_utils
    import vllm.entrypoints.openai.api_server
    from vllm import LLM, SamplingParams
    from vllm.config import EngineConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.engine.async_llm_engine import AsyncLLMEngine
    from vllm.entrypoints.llm import LLM as LLM2
    from vllm.entrypoints.openai.api_server import run_server
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.exceptions import VLLMValidationError as VVE
    from vllm.inputs import TextPrompt
    from vllm.inputs.data import TokensPrompt
    from vllm.logprobs import Logprob
    from vllm.model_executor.models import ModelRegistry
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from perfxlm.engine.arg_utils import UsageContext as OurUsageContext
    from perfxlm.entrypoints.openai import api_server, cli_args
    from perfxlm.models.registry import ModelRegistry as OurRegistry
    assert LLM is LLM2 is perfxlm.LLM and SamplingParams is perfxlm.SamplingParams
    assert (EngineArgs, AsyncEngineArgs, EngineConfig) == (perfxlm.EngineArgs, perfxlm.AsyncEngineArgs,
                                                           perfxlm.EngineConfig)
    assert AsyncLLM is AsyncLLMEngine is perfxlm.AsyncLLMEngine
    assert (TextPrompt, TokensPrompt, Logprob) == (perfxlm.TextPrompt, perfxlm.TokensPrompt, perfxlm.Logprob)
    assert (RequestOutput, CompletionOutput, RequestOutputKind) == (
        perfxlm.RequestOutput, perfxlm.CompletionOutput, perfxlm.RequestOutputKind)
    assert VVE is VLLMValidationError and UsageContext is OurUsageContext and ModelRegistry is OurRegistry
    assert FlexibleArgumentParser is cli_args.FlexibleArgumentParser and make_arg_parser is cli_args.make_arg_parser
    assert run_server is api_server.run_server and vllm.entrypoints.openai.api_server is api_server
    # the alias is the module object itself: perfxlm's module keeps its own name and spec
    assert sys.modules["vllm.engine.arg_utils"] is sys.modules["perfxlm.engine.arg_utils"]
    assert vllm.engine.arg_utils.__spec__.name == "perfxlm.engine.arg_utils"


def test_version_and_top_level(shim):
    from vllm.version import __version__, __version_tuple__
    assert shim.__version__ == __version__ == finder.VLLM_VERSION == "0.32.0"
    assert shim.__version_tuple__ == __version_tuple__ == (0, 32, 0)
    assert shim.__all__ == perfxlm.__all__ and "LLM" in dir(shim)
    with pytest.raises(AttributeError, match="module 'vllm' has no attribute 'NoSuchName'"):
        shim.NoSuchName  # noqa: B018


def test_beam_search_maps_to_perfxlm(shim):
    if importlib.util.find_spec("perfxlm.beam_search") is None:
        pytest.skip("perfxlm.beam_search is not in this tree")
    ours = importlib.import_module("perfxlm.beam_search")
    assert importlib.import_module("vllm.beam_search") is ours  # before vLLM 0.32
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchOutput  # vLLM 0.32
    assert BeamSearchOutput is ours.BeamSearchOutput


@pytest.mark.parametrize("name, says", [
    ("vllm.platforms", "No module named 'vllm.platforms': perfxlm serves `vllm` here and has no counterpart"),
])
def test_what_perfxlm_lacks_is_a_module_not_found(shim, name, says):
    with pytest.raises(ModuleNotFoundError, match=says.replace("(", r"\(")) as e:
        importlib.import_module(name)
    assert e.value.name in (name, name.rsplit(".", 1)[0])


def test_a_missing_target_names_the_vllm_path(shim, monkeypatch):
    monkeypatch.setitem(finder.MODULES, "vllm.beam_search", "perfxlm.not_written_yet")
    sys.modules.pop("vllm.beam_search", None)
    with pytest.raises(ModuleNotFoundError, match="No module named 'vllm.beam_search': perfxlm serves `vllm` "
                                                  "here and has no perfxlm.not_written_yet, its counterpart"):
        import vllm.beam_search  # noqa: F401


def test_table_children_keep_their_leaf_name():
    """The import system sets `vllm.a.b` as attribute `b` of `vllm.a`'s module: where `vllm.a` is a
    perfxlm package, `b` must be that package's own `b`, or perfxlm's package would be altered."""
    for name, target in finder.MODULES.items():
        parent, leaf = name.rsplit(".", 1)
        parent_target = finder.MODULES.get(parent)
        if parent_target is not None and importlib.util.find_spec(parent_target).submodule_search_locations:
            assert target == f"{parent_target}.{leaf}", name
        else:
            assert parent in finder.PACKAGES or parent == "vllm" or parent_target is not None, name


def test_install_refuses_after_a_real_vllm_import(monkeypatch):
    real = types.ModuleType("vllm")
    real.__file__ = "/site-packages/vllm/__init__.py"
    monkeypatch.setitem(sys.modules, "vllm", real)
    with pytest.raises(RuntimeError, match="vllm is already imported from '/site-packages/vllm/__init__.py'"):
        install()
    assert not is_installed()


def test_vllm_classes_generate_with_a_tokens_prompt(shim, smol_llm, smol_tokenizer):
    """vLLM's SamplingParams, RequestOutput and TokensPrompt, imported by their vLLM paths, drive
    perfxlm's LLM and are perfxlm's classes."""
    from vllm.inputs import TokensPrompt
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams

    from perfxlm import outputs, sampling_params
    ids = smol_tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=6)
    assert isinstance(params, sampling_params.SamplingParams)
    [out] = smol_llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
    assert isinstance(out, RequestOutput) and isinstance(out, outputs.RequestOutput)
    assert out.prompt_token_ids == ids and len(out.outputs[0].token_ids) == 6
    [again] = smol_llm.generate(perfxlm.TokensPrompt(prompt_token_ids=ids),
                                perfxlm.SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


# ---- vLLM's own SamplingParams -> perfxlm's --------------------------------------------------

class _VllmOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_VllmOutputKind.__name__ = "RequestOutputKind"


@dataclasses.dataclass
class _VllmStructuredOutputs:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    _backend: str | None = dataclasses.field(default=None, init=False)


_VllmStructuredOutputs.__name__ = "StructuredOutputsParams"


def _vllm_sampling_params_class(**extra_fields: object) -> type:
    """A stand-in with vLLM 0.32's SamplingParams fields, in its order, and its defaults (vLLM's
    is a msgspec Struct; msgspec is not a perfxlm dependency, so a dataclass here)."""
    fields = [("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
              ("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("seed", None), ("stop", None),
              ("stop_token_ids", None), ("ignore_eos", False), ("max_tokens", 16), ("min_tokens", 0),
              ("logprobs", None), ("prompt_logprobs", None), ("prompt_logprob_token_ids", None),
              ("prompt_logprob_start", None), ("logprob_token_ids", None), ("flat_logprobs", False),
              ("detokenize", True), ("skip_special_tokens", True), ("spaces_between_special_tokens", True),
              ("include_stop_str_in_output", False), ("output_kind", _VllmOutputKind.CUMULATIVE),
              ("stream_interval", None), ("skip_clone", False), ("output_text_buffer_length", 0),
              ("_eos_token_id", None), ("_all_stop_token_ids", dataclasses.field(default_factory=set)),
              ("structured_outputs", None), ("logit_bias", None), ("allowed_token_ids", None),
              ("extra_args", None), ("bad_words", None), ("_bad_words_token_ids", None),
              ("skip_reading_prefix_cache", None), ("thinking_token_budget", None), ("repetition_detection", None),
              ("routed_experts_prompt_start", 0), ("trace_decode_token_ids", None), *extra_fields.items()]
    return dataclasses.make_dataclass("SamplingParams", [(name, object, default) for name, default in fields])


def test_coerce_copies_every_field():
    VllmSamplingParams = _vllm_sampling_params_class()
    theirs = VllmSamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=11, stop=["\n\n"],
                                stop_token_ids=[2, 2, 7], max_tokens=33, min_tokens=3, logprobs=2,
                                presence_penalty=0.5, repetition_penalty=1.1, bad_words=["xyz"],
                                logit_bias={5: 1.5}, include_stop_str_in_output=True,
                                output_kind=_VllmOutputKind.DELTA, extra_args={"k": 1},
                                structured_outputs=_VllmStructuredOutputs(regex="[ab]+"),
                                output_text_buffer_length=99, _eos_token_id=123)
    ours = coerce_sampling_params(theirs)
    assert type(ours) is perfxlm.SamplingParams
    assert (ours.n, ours.temperature, ours.top_p, ours.top_k, ours.min_p, ours.seed) == (2, 0.7, 0.9, 5, 0.05, 11)
    assert (ours.stop, ours.stop_token_ids, ours.max_tokens, ours.min_tokens, ours.logprobs) == (
        ["\n\n"], [2, 7], 33, 3, 2)
    assert (ours.presence_penalty, ours.repetition_penalty, ours.bad_words, ours.logit_bias) == (
        0.5, 1.1, ["xyz"], {5: 1.5})
    assert ours.include_stop_str_in_output and ours.extra_args == {"k": 1}
    assert ours.output_kind is perfxlm.RequestOutputKind.DELTA
    assert type(ours.structured_outputs) is perfxlm.StructuredOutputsParams
    assert ours.structured_outputs.regex == "[ab]+"
    # derived state is perfxlm's own, not copied: no stop string is held back when it is kept in the text
    assert ours.output_text_buffer_length == 0 and ours.eos_token_id is None
    assert coerce_sampling_params(ours) is ours


def test_coerce_defaults_equal_perfxlm_defaults():
    assert coerce_sampling_params(_vllm_sampling_params_class()()) == perfxlm.SamplingParams()


def test_coerce_validates_with_vllm_messages():
    VllmSamplingParams = _vllm_sampling_params_class()
    with pytest.raises(VLLMValidationError, match=r"top_p must be in \(0, 1\], got 0.0."):
        coerce_sampling_params(VllmSamplingParams(top_p=0.0))


def test_coerce_names_an_unsupported_field_only_when_set():
    VllmSamplingParams = _vllm_sampling_params_class(watermark_key=None)
    assert coerce_sampling_params(VllmSamplingParams(temperature=0.5)).temperature == 0.5
    with pytest.raises(NotImplementedError, match=r"SamplingParams.watermark_key \(got 'k1'\)"):
        coerce_sampling_params(VllmSamplingParams(watermark_key="k1"))


def test_coerce_refuses_what_is_not_sampling_params():
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got builtins.dict"):
        coerce_sampling_params({"temperature": 0.5})


def test_coerce_reads_a_msgspec_struct():
    msgspec = pytest.importorskip("msgspec")

    class SamplingParams(msgspec.Struct, omit_defaults=True, dict=True):
        n: int = 1
        temperature: float = 1.0
        top_k: int = 0
        output_kind: _VllmOutputKind = _VllmOutputKind.CUMULATIVE
        output_text_buffer_length: int = 0
        _all_stop_token_ids: set[int] = msgspec.field(default_factory=set)
        guided_decoding: object = None

    ours = coerce_sampling_params(SamplingParams(temperature=0.3, top_k=4, output_kind=_VllmOutputKind.FINAL_ONLY))
    assert (ours.temperature, ours.top_k, ours.output_kind) == (0.3, 4, perfxlm.RequestOutputKind.FINAL_ONLY)
    with pytest.raises(NotImplementedError, match="SamplingParams.guided_decoding"):
        coerce_sampling_params(SamplingParams(guided_decoding="x"))

"""``llmops models import`` against a real registry server: models made elsewhere become root versions.

Invariant: importing a GGUF file or a Hugging Face folder registers a READY, full-precision
version with no lineage parent, tagged with where it came from (``source`` = name and sha256 of
the GGUF file or of config.json, ``imported_from``) and the given ``base_model``/aliases; its
downloaded files load with a plain ``from_pretrained(folder)``, keep the chat template and
generate (a GGUF's converted weights compute what the model it was exported from computes). A
path that is neither a model folder nor a GGUF file exits 1 with a one-line error, uploading nothing.

The GGUF is an F16 export of the tiny model by the project's own exporter (SmolLM2 is too slow here).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from llmops.cli import app
from llmops.common.artifacts.client import download_to_directory
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.quantization.methods.base import QuantizationSpec
from llmops.quantization.methods.gguf_export import GgufQuantizer
from llmops.registry.importer import import_model
from llmops.registry.validation import warm_up
from tests.integration.registry.conftest import RunningRegistry

pytestmark = pytest.mark.slow
BASE_MODEL = "tests/tiny-llama"


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return build_tiny_model().path


@pytest.fixture(scope="module")
def gguf_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    warm_up()  # the server may be importing transformers too: its lazy module breaks under a race
    quantizer = GgufQuantizer()
    spec = quantizer.validate(QuantizationSpec("gguf", gguf_type="F16"))
    out = tmp_path_factory.mktemp("gguf") / "export"
    quantizer.quantize(tiny_dir, out, spec)
    return next(out.glob("*.gguf"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _cli(registry: RunningRegistry, *args: str) -> Result:
    runner = CliRunner()
    # The command runs its own event loop: keep it off this one, which serves the registry.
    return await asyncio.to_thread(
        runner.invoke, app, ["models", *args, "--address", registry.address], env={"COLUMNS": "400"}
    )


async def _download(registry: RunningRegistry, ref: model_pb2.ModelRef, destination: Path) -> Path:
    await download_to_directory(registry.client, ref, destination)
    return destination


@torch.no_grad()
def _load_and_generate(folder: Path, source: Path) -> tuple[int, bool]:
    """(tokens generated from a chat prompt, whether the logits match ``source``'s model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def add(a, b):"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.eval().generate(**prompt, max_new_tokens=8, do_sample=False)
    ids = torch.arange(5, 69).unsqueeze(0)
    expected = AutoModelForCausalLM.from_pretrained(source).eval()(input_ids=ids).logits
    got = model(input_ids=ids).logits
    close = torch.allclose(got, expected, atol=0.02 * float(expected.abs().max()))
    return generated.shape[1] - prompt["input_ids"].shape[1], close


async def test_a_gguf_file_becomes_a_root_fp32_version(
    registry: RunningRegistry, gguf_file: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    stages: list[str] = []
    version = await import_model(
        registry.client,
        gguf_file,
        "imported-gguf",
        base_model=BASE_MODEL,
        description="from a GGUF file",
        stage=stages.append,
    )
    assert (version.name, version.version) == ("imported-gguf", 1)
    assert version.status == pb.VERSION_STATUS_READY
    assert version.format == model_pb2.MODEL_FORMAT_FP32
    assert not version.lineage.HasField("parent")
    assert version.tags["source"] == f"{gguf_file.name}@sha256:{_sha256(gguf_file)}"
    assert version.tags["imported_from"] == "gguf"
    assert version.base_model == BASE_MODEL
    assert version.parameter_count > 0
    assert any(s.startswith("converting") for s in stages) and any(s.startswith("uploading") for s in stages)

    ref = model_pb2.ModelRef(name="imported-gguf", version=1)
    folder = await _download(registry, ref, tmp_path / "gguf")
    assert not list(folder.glob("*.gguf")) and (folder / "model.safetensors").is_file()
    new_tokens, close = await asyncio.to_thread(_load_and_generate, folder, tiny_dir)
    assert new_tokens > 0
    assert close, "the converted GGUF weights do not compute what the exported model computes"


async def test_a_hf_folder_is_uploaded_as_it_is_with_its_alias(
    registry: RunningRegistry, tiny_dir: Path, tmp_path: Path
) -> None:
    result = await _cli(
        registry, "import", str(tiny_dir), "--name", "imported-folder", "--alias", "champion",
        "--base-model", BASE_MODEL, "--description", "the tiny model",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "imported imported-folder:1" in result.output

    ref = model_pb2.ModelRef(name="imported-folder", alias="champion")
    response = await registry.client.unary(registry.client.stub.GetVersion, pb.GetVersionRequest(model=ref))
    version = response.version
    assert version.version == 1 and "champion" in version.aliases
    assert version.status == pb.VERSION_STATUS_READY
    assert version.format == model_pb2.MODEL_FORMAT_FP32
    assert not version.lineage.HasField("parent")
    assert version.tags["source"] == f"{tiny_dir.name}@sha256:{_sha256(tiny_dir / 'config.json')}"
    assert version.tags["imported_from"] == "hf-folder"
    assert version.base_model == BASE_MODEL and version.description == "the tiny model"

    folder = await _download(registry, ref, tmp_path / "folder")
    assert _sha256(folder / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    new_tokens, close = await asyncio.to_thread(_load_and_generate, folder, tiny_dir)
    assert new_tokens > 0 and close


@pytest.mark.parametrize("kind", ["text file", "empty folder", "fake gguf", "missing"])
async def test_a_path_that_is_no_model_exits_1_with_one_line(
    registry: RunningRegistry, tmp_path: Path, kind: str
) -> None:
    path = {
        "text file": tmp_path / "notes.txt",
        "empty folder": tmp_path / "empty",
        "fake gguf": tmp_path / "fake.gguf",
        "missing": tmp_path / "nowhere",
    }[kind]
    if kind == "empty folder":
        path.mkdir()
    elif kind != "missing":
        path.write_text("not a model\n")
    result = await _cli(registry, "import", str(path), "--name", "never-imported")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: INVALID_ARGUMENT: "), result.output
    assert str(path) in lines[0]
    listed = await registry.client.unary(
        registry.client.stub.ListModels, pb.ListModelsRequest(name_prefix="never-imported")
    )
    assert not listed.models

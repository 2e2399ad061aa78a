"""The protos follow the buf style guide, are fully documented, and match the committed code.

Guards three invariants:
- services/llmops/proto/ is exactly what scripts/gen_protos.py generates from protos/ (no drift, no hand
  edits), and every generated module imports as ``llmops.proto.*``;
- the API follows buf style: packages ``llmops.<name>.v1`` in matching folders, services named
  ``*Service``, a ``<Rpc>Request``/``<Rpc>Response`` pair of its own for every RPC (streaming ones
  too), enums whose values carry the enum's prefix and start at ``<ENUM>_UNSPECIFIED = 0``,
  lower_snake fields that are not Python keywords, paging fields on every paged List RPC;
- every service, RPC, message, field, oneof, enum and enum value has a leading comment (units,
  ranges, defaults live there), read from protoc's descriptors with source info.
"""

from __future__ import annotations

import importlib
import keyword
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED = REPO_ROOT / "services" / "llmops" / "proto"
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"

# Field numbers of descriptor messages, as used in SourceCodeInfo.Location.path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

# Streaming shape of every streaming RPC: (client streams, server streams). All others are unary.
STREAMING = {
    "llmops.registry.v1.RegistryService.RegisterVersion": (True, False),
    "llmops.registry.v1.RegistryService.DownloadArtifact": (False, True),
    "llmops.training.v1.TrainingService.WatchJob": (False, True),
    "llmops.quantization.v1.QuantizationService.WatchJob": (False, True),
    "llmops.serving.v1.ServingService.GenerateStream": (False, True),
    "llmops.serving.v1.ServingService.WatchLoad": (False, True),
}
# List RPCs that return everything at once, with the reason in their request's comment.
UNPAGED_LISTS = {
    "llmops.serving.v1.ServingService.ListModels",
    "llmops.router.v1.RouterService.ListEndpoints",
}

FieldType = descriptor_pb2.FieldDescriptorProto
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def upper_snake(name: str) -> str:
    """ModelFormat -> MODEL_FORMAT, the prefix buf expects on enum values."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    """Our protos' descriptors, with comments, compiled by the pinned protoc."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *protos,
    ]
    assert protoc.main(args) == 0, "protoc failed to compile protos/"
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(descriptor_set.file) == len(protos)
    return list(descriptor_set.file)


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str, path: tuple[int, ...]
) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.DescriptorProto]]:
    for i, message in enumerate(messages):
        if message.options.map_entry:
            continue  # synthetic message behind a map<,> field; indices still count it
        name = f"{prefix}.{message.name}"
        here = (*path, i)
        yield name, here, message
        yield from _messages(list(message.nested_type), name, (*here, MSG_NESTED))


def _all_messages(
    f: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.DescriptorProto]]:
    yield from _messages(list(f.message_type), f.package, (FILE_MESSAGE,))


def _all_enums(
    f: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...], descriptor_pb2.EnumDescriptorProto]]:
    for i, enum in enumerate(f.enum_type):
        yield f"{f.package}.{enum.name}", (FILE_ENUM, i), enum
    for name, path, message in _all_messages(f):
        for i, enum in enumerate(message.enum_type):
            yield f"{name}.{enum.name}", (*path, MSG_ENUM, i), enum


def _all_methods(
    f: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    for service in f.service:
        for method in service.method:
            yield f"{f.package}.{service.name}.{method.name}", method


def _messages_by_name(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> dict[str, descriptor_pb2.DescriptorProto]:
    return {f".{name}": message for f in files for name, _, message in _all_messages(f)}


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        "services/llmops/proto/ drifted from protos/; run `make proto`\n" + result.stdout + result.stderr
    )


def test_every_generated_module_imports() -> None:
    modules = sorted(
        ".".join(("llmops", "proto", *p.relative_to(GENERATED).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in GENERATED.rglob("*.py")
    )
    assert any(m.endswith("_pb2_grpc") for m in modules), "no gRPC modules generated"
    for name in modules:
        importlib.import_module(name)
    serving = importlib.import_module("llmops.proto.serving.v1.serving_service_pb2")
    assert serving.GenerateRequest.__module__ == "llmops.proto.serving.v1.serving_service_pb2"


def test_packages_match_folders(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    for f in files:
        assert re.fullmatch(r"llmops\.[a-z]+\.v1", f.package), f.name
        assert f.name.rsplit("/", 1)[0] == f.package.replace(".", "/"), f.name
        assert f.syntax == "proto3", f.name
        area = f.package.split(".")[1]
        if f.service:
            # One service per file, named after it: registry_service.proto holds RegistryService;
            # a service's package may host more (registry/v1/rollout_service.proto: RolloutService).
            stem = f.name.rsplit("/", 1)[1].removesuffix("_service.proto")
            assert f.name == f"llmops/{area}/v1/{stem}_service.proto", f.name
            assert len(f.service) == 1, f.name
            assert f.service[0].name == stem.title().replace("_", "") + "Service", f.name


def test_all_five_services_exist(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    # the six main services; further ones live in their packages (the registry hosts RolloutService)
    services = sorted(
        f"{f.package}.{s.name}"
        for f in files
        for s in f.service
        if f.name.endswith(f"/{f.package.split('.')[1]}_service.proto")
    )
    assert services == [
        "llmops.cache.v1.CacheService",
        "llmops.quantization.v1.QuantizationService",
        "llmops.registry.v1.RegistryService",
        "llmops.router.v1.RouterService",
        "llmops.serving.v1.ServingService",
        "llmops.training.v1.TrainingService",
    ]


def test_rpcs_have_their_own_request_and_response(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for f in files:
        used: set[str] = set()
        for service in f.service:
            assert PASCAL.match(service.name) and service.name.endswith("Service"), service.name
            for method in service.method:
                full = f"{f.package}.{service.name}.{method.name}"
                assert PASCAL.match(method.name), full
                assert method.input_type == f".{f.package}.{method.name}Request", full
                assert method.output_type == f".{f.package}.{method.name}Response", full
                assert not {method.input_type, method.output_type} & used, full
                used |= {method.input_type, method.output_type}
                shape = (method.client_streaming, method.server_streaming)
                assert shape == STREAMING.get(full, (False, False)), f"{full} streams as {shape}"
    methods = {name for f in files for name, _ in _all_methods(f)}
    assert set(STREAMING) <= methods


def test_enums_are_prefixed_and_start_unspecified(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for f in files:
        for name, _, enum in _all_enums(f):
            assert PASCAL.match(enum.name), name
            prefix = upper_snake(enum.name)
            first = enum.value[0]
            assert (first.name, first.number) == (f"{prefix}_UNSPECIFIED", 0), name
            for value in enum.value:
                assert value.name.startswith(f"{prefix}_"), f"{name}.{value.name}"
                assert re.fullmatch(r"[A-Z][A-Z0-9_]*", value.name), f"{name}.{value.name}"


def test_names_are_buf_style_and_python_safe(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for f in files:
        for name, _, message in _all_messages(f):
            assert PASCAL.match(message.name), name
            for field in message.field:
                assert LOWER_SNAKE.match(field.name), f"{name}.{field.name}"
                assert not keyword.iskeyword(field.name), f"{name}.{field.name} is a Python keyword"
            for oneof in message.oneof_decl:
                assert LOWER_SNAKE.match(oneof.name.lstrip("_")), f"{name}.{oneof.name}"


def test_list_rpcs_page(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    messages = _messages_by_name(files)
    for f in files:
        for full, method in _all_methods(f):
            if not method.name.startswith("List") or full in UNPAGED_LISTS:
                continue
            request = {fd.name: fd.type for fd in messages[method.input_type].field}
            response = {fd.name: fd.type for fd in messages[method.output_type].field}
            int32, string = FieldType.TYPE_INT32, FieldType.TYPE_STRING
            assert request.get("page_size") == int32, full
            assert request.get("page_token") == string, full
            assert response.get("next_page_token") == string, full


def test_generate_and_generate_stream_take_the_same_request(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    messages = _messages_by_name(files)

    def shape(name: str) -> list[tuple[str, int, int, str, int]]:
        return [
            (fd.name, fd.number, fd.type, fd.type_name, fd.label)
            for fd in messages[f".llmops.serving.v1.{name}"].field
        ]

    assert shape("GenerateRequest") == shape("GenerateStreamRequest")


def test_everything_has_a_leading_comment(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    missing: list[str] = []
    for f in files:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}

        def need(path: tuple[int, ...], what: str, comments: dict[tuple[int, ...], str] = comments) -> None:
            if not comments.get(path):
                missing.append(what)

        for i, service in enumerate(f.service):
            need((FILE_SERVICE, i), f"service {f.package}.{service.name}")
            for j, method in enumerate(service.method):
                need((FILE_SERVICE, i, SERVICE_METHOD, j), f"rpc {f.package}.{service.name}.{method.name}")
        for name, path, message in _all_messages(f):
            need(path, f"message {name}")
            for j, field in enumerate(message.field):
                need((*path, MSG_FIELD, j), f"field {name}.{field.name}")
            for j, oneof in enumerate(message.oneof_decl):
                synthetic = any(
                    fd.proto3_optional and fd.HasField("oneof_index") and fd.oneof_index == j
                    for fd in message.field
                )
                if not synthetic:  # proto3 `optional` makes a hidden oneof with no source
                    need((*path, MSG_ONEOF, j), f"oneof {name}.{oneof.name}")
        for name, path, enum in _all_enums(f):
            need(path, f"enum {name}")
            for j, value in enumerate(enum.value):
                need((*path, ENUM_VALUE, j), f"enum value {name}.{value.name}")
    assert not missing, "undocumented:\n" + "\n".join(missing)

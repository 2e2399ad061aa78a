"""``llmops generate`` and ``llmops serving models|load|unload``: the serving API from a terminal.

Everything goes through the gRPC API (``serving.address`` from settings, or ``--address``).
``llmops generate`` streams tokens to the terminal as they come (``--no-stream`` waits for the whole
answer); every decoding control has a flag.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import duration_pb2
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmops.common.clients import ServingClient
from llmops.common.convert import model_ref_to_proto
from llmops.common.errors import LLMOpsError
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import ModelRef

T = TypeVar("T")
serving_app = typer.Typer(name="serving", help="Models loaded on a serving server.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Serving host:port; default from settings (serving.address)")
]
ENGINES = {
    "vllm": pb.ENGINE_VLLM,
    "transformers": pb.ENGINE_TRANSFORMERS,
    "tensorrt_llm": pb.ENGINE_TENSORRT_LLM,
}
STATES = {v: k.removeprefix("LOADED_MODEL_STATE_").lower() for k, v in pb.LoadedModelState.items()}


def register(app: typer.Typer) -> None:
    """Mount ``llmops generate`` and ``llmops serving`` on the ``llmops`` command."""
    app.command("generate")(generate)
    app.add_typer(serving_app)


def _address(address: str | None) -> str:
    if address:
        return address
    from llmops.common.settings import Settings, SettingsError

    try:
        return Settings.load().serving.address
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _run(address: str | None, work: Callable[[ServingClient], Awaitable[T]], timeout: float = 600) -> T:
    async def main() -> T:
        async with ServingClient.connect(_address(address), timeout=timeout) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except LLMOpsError as exc:
        err.print(f"[red]error:[/red] {exc.code.name}: {escape(exc.message)}", highlight=False)
        raise typer.Exit(1) from None


def _ref(text: str) -> model_pb2.ModelRef:
    return model_ref_to_proto(ModelRef.parse(text))


def _selector(model: str | None) -> pb.ModelSelector:
    return pb.ModelSelector(served_name=model) if model else pb.ModelSelector()


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Served name; optional with one model")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come")] = True,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send the prompt as a user message (chat template)")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message (implies --chat)")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Most tokens to generate")] = 128,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the most likely token")] = False,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature (0 = greedy)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens")] = 0,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass")] = None,
    min_p: Annotated[float, typer.Option("--min-p", help="Drop tokens below min_p x the best")] = 0.0,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty")] = None,
    presence_penalty: Annotated[float, typer.Option("--presence-penalty")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option("--frequency-penalty")] = 0.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of completions")] = 1,
    beam_width: Annotated[int, typer.Option("--beam-width", help="Beam search with this width")] = 0,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Generate past EOS up to max tokens")
    ] = False,
    address: AddressOption = None,
) -> None:
    """Generate text with a served model, streaming it to the terminal."""
    text = sys.stdin.read() if prompt == "-" else prompt
    if chat or system:
        messages = ([generation_pb2.ChatMessage(role="system", content=system)] if system else []) + [
            generation_pb2.ChatMessage(role="user", content=text)
        ]
        prompt_message = generation_pb2.Prompt(chat=generation_pb2.ChatPrompt(messages=messages))
    else:
        prompt_message = generation_pb2.Prompt(text=text)
    sampling = sampling_pb2.SamplingParams(
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        stop=stop or [],
        max_tokens=max_tokens,
        seed=seed,
        n=n,
        use_beam_search=beam_width > 0,
        beam_width=beam_width,
        ignore_eos=ignore_eos,
    )

    async def unary(client: ServingClient) -> None:
        request = pb.GenerateRequest(model=_selector(model), prompt=prompt_message, sampling=sampling)
        response = await client.unary(client.stub.Generate, request)
        for completion in response.output.completions:
            if len(response.output.completions) > 1:
                out.rule(f"completion {completion.index}")
            sys.stdout.write(completion.text + "\n")  # as generated: no markup, tabs kept
        usage = response.output.usage
        err.print(f"[dim]{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens[/dim]")

    async def streamed(client: ServingClient) -> None:
        request = pb.GenerateStreamRequest(model=_selector(model), prompt=prompt_message, sampling=sampling)
        async for message in client.stream(client.stub.GenerateStream, request, timeout=client.timeout):
            if message.WhichOneof("event") == "delta":
                prefix = f"[{message.delta.index}] " if n > 1 and message.delta.text_delta else ""
                sys.stdout.write(prefix + message.delta.text_delta)
                sys.stdout.flush()
            else:
                usage = message.end.usage
                sys.stdout.write("\n")
                err.print(
                    f"[dim]{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens[/dim]"
                )

    _run(address, streamed if stream else unary)


@serving_app.command("models")
def models(
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the models a server has loaded or is loading."""

    async def work(client: ServingClient) -> pb.ListModelsResponse:
        return await client.unary(client.stub.ListModels, pb.ListModelsRequest())

    response = _run(address, work)
    if as_json:
        from google.protobuf import json_format

        out.print_json(json_format.MessageToJson(response))
        return
    table = Table("served name", "engine", "state", "source", "context", "adapters")
    for m in response.models:
        source = f"{m.model.name}:{m.model.version}" if m.HasField("model") else m.local_path
        engine = pb.Engine.Name(m.engine).removeprefix("ENGINE_").lower()
        state = STATES.get(m.state, "?") + (f" ({m.error_message})" if m.error_message else "")
        table.add_row(
            m.served_name, engine, state, source, str(m.max_model_len), ", ".join(a.name for a in m.adapters)
        )
    out.print(table)


@serving_app.command("load")
def load(
    source: Annotated[
        str, typer.Argument(help="A folder on the server, or a registry ref: name, name:3, name@alias")
    ],
    name: Annotated[str, typer.Option("--name", help="Served name; default: model or folder name")] = "",
    engine: Annotated[str | None, typer.Option(help="vllm | transformers | tensorrt_llm")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Engine option key=value (repeatable)")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Swap out a model already served under the name")] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return while the model is still loading")
    ] = False,
    follow_alias: Annotated[bool, typer.Option("--follow-alias", help="Reload when the alias moves")] = False,
    address: AddressOption = None,
) -> None:
    """Load a model into an engine on the server."""
    request = pb.LoadModelRequest(
        served_name=name, replace=replace, no_wait=no_wait, follow_alias=follow_alias
    )
    if Path(source).expanduser().is_dir() or source.startswith(("/", ".", "~")):
        request.local_path = str(Path(source).expanduser().resolve())
    else:
        request.model_ref.CopyFrom(_ref(source))
    if engine is not None:
        if engine not in ENGINES:
            err.print(f"[red]error:[/red] unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
            raise typer.Exit(2)
        request.engine = ENGINES[engine]
    from google.protobuf import json_format

    options: dict[str, Any] = {}
    for item in option or []:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    try:
        json_format.ParseDict(options, request.options)
    except json_format.ParseError as exc:
        err.print(f"[red]error:[/red] bad --option: {exc}", highlight=False)
        raise typer.Exit(2) from None

    async def work(client: ServingClient) -> pb.LoadModelResponse:
        return await client.unary(client.stub.LoadModel, request, timeout=3600)

    model = _run(address, work).model
    out.print(f"{model.served_name}: {STATES.get(model.state, '?')} (context {model.max_model_len} tokens)")


@serving_app.command("unload")
def unload(
    name: Annotated[str, typer.Argument(help="Served name")],
    drain: Annotated[float, typer.Option(help="Seconds in-flight requests may still run")] = 30.0,
    address: AddressOption = None,
) -> None:
    """Stop serving a model and free its memory."""
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(int(drain * 1e9))
    request = pb.UnloadModelRequest(model=pb.ModelSelector(served_name=name), drain_timeout=timeout)

    async def work(client: ServingClient) -> pb.UnloadModelResponse:
        return await client.unary(client.stub.UnloadModel, request, timeout=drain + 120)

    result = _run(address, work)
    out.print(f"unloaded {result.served_name} ({result.aborted_requests} requests aborted)")

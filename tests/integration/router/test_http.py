"""The router's OpenAI-compatible HTTP API, in front of real replicas' HTTP APIs.

Invariants: completions and chat completions (whole and streamed) come back as a replica gives
them, through the policy the headers pick; /v1/models lists the fleet's models; a bad routing
header or body is a 400 with an OpenAI error body, before any replica is touched.
"""

from __future__ import annotations

import httpx

from tests.integration.router.conftest import Fleet


async def test_openai_api_through_the_router(fleet: Fleet, make_router) -> None:
    replicas = await fleet.start(2)
    router = await make_router([r.address for r in replicas], policy="round_robin")
    await router.wait_ready(2)
    base = f"http://127.0.0.1:{router.app.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        models = (await http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]

        body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0}
        direct = await http.post(f"http://127.0.0.1:{replicas[0].http_port}/v1/completions", json=body)
        routed = await http.post("/v1/completions", json=body)
        assert routed.status_code == 200, routed.text
        assert routed.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]

        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat, headers={"x-llmops-session-id": "s1"}
        ) as sse:
            assert sse.status_code == 200
            lines = [line async for line in sse.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2

        before = sum(e.requests for e in await router.endpoints())
        bad = await http.post("/v1/completions", json=body, headers={"x-llmops-route-policy": "fastest"})
        assert bad.status_code == 400 and "x-llmops-route-policy" in bad.json()["error"]["message"]
        not_json = await http.post(
            "/v1/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert sum(e.requests for e in await router.endpoints()) == before
    # the completion and the session's chat: two requests routed (where the session's hash lands)
    assert sum(e.requests for e in await router.endpoints()) == 2

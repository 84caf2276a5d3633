"""A local, offline, OpenAI-compatible HTTP endpoint that reports realistic usage.

:class:`StubOpenAIServer` serves ``POST /v1/chat/completions``, ``POST /v1/completions``
(both plain and ``stream: true`` server-sent events) and ``GET /v1/models`` on 127.0.0.1,
so that the real ``openai`` / ``langchain_openai`` clients can be driven over real HTTP::

    with StubOpenAIServer() as server:
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="sk-test")
        llm.invoke("hi")
        assert server.requests[-1].prompt_tokens == 8  # 3 + "user" + "hi" + 3

Usage is counted with cl100k the way OpenAI documents it (see ``_tokens``), prompt caching,
context windows, ``max_tokens``/``max_completion_tokens``, ``n``, ``stop`` and reasoning
tokens behave like OpenAI's, and :meth:`StubOpenAIServer.enqueue` scripts the next
responses (reply text, usage, HTTP errors, broken streams, latency). Standard library only,
plus tiktoken for counting.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from budgetguard.testing import _behaviour, _payloads, _tokens
from budgetguard.testing._http import Handler, HTTPError, LocalHTTPServer, error_body
from budgetguard.testing._payloads import OMIT, Choice

__all__ = [
    "DEFAULT_CONTEXT_WINDOWS",
    "REASONING_MODEL_PREFIXES",
    "RecordedRequest",
    "ScriptedResponse",
    "StubOpenAIServer",
]

DEFAULT_CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-4.1": 1_047_576,
    "gpt-3.5-turbo": 16_385,
    "gpt-3.5-turbo-instruct": 4_096,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "gpt-5": 400_000,
    "tiny-model": 1_024,
}
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_LEGACY_DEFAULT_MAX_TOKENS = 16  # what OpenAI's /v1/completions assumes without max_tokens


@dataclasses.dataclass
class ScriptedResponse:
    """One scripted answer, consumed by the next completion request (see ``enqueue``).

    Attributes:
        reply: reply text instead of the generated one (still cut by ``max_tokens``/``stop``).
        usage: a dict is merged (nested dicts too) over the computed usage, so
            ``{"prompt_tokens": -5}`` makes malformed usage; any other non-None value
            (``"garbage"``, ``[]``) replaces the usage object verbatim.
        omit_usage: send no ``usage`` at all (plain responses and streams).
        status: answer with this HTTP error status and an OpenAI error body instead.
        error: fields merged over the default error object (``message``, ``type``, ``code``...).
        retry_after: seconds for ``Retry-After``/``retry-after-ms`` (429 defaults to 1.0).
        headers: extra response headers.
        break_after: streams: drop the connection after this many ``data:`` events, without
            ``[DONE]`` and without the chunked terminator; plain: after half the body.
        latency: seconds to wait before answering (replaces the server-wide ``latency``).
        finish_reason: force this finish_reason on every choice.
        tool_calls: ``[{"name": ..., "arguments": dict | str, "id": optional}]`` to answer
            with tool calls (finish_reason ``tool_calls``); their name and arguments count
            as completion tokens. Unscripted, the server calls a bound tool or answers in
            JSON when the request asks the way a capable model would (see ``_behaviour``).
        reasoning_tokens: override the server's reasoning tokens for reasoning models.
    """

    reply: str | None = None
    usage: Any = None
    omit_usage: bool = False
    status: int | None = None
    error: dict[str, Any] | None = None
    retry_after: float | None = None
    headers: dict[str, str] | None = None
    break_after: int | None = None
    latency: float | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_tokens: int | None = None


@dataclasses.dataclass
class RecordedRequest:
    """What the server received and answered; appended to ``server.requests`` on receipt."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (None when empty or not JSON)
    model: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    status: int | None = None  # set before the response is written
    broken: bool = False  # connection dropped on purpose (``break_after``)
    scripted: ScriptedResponse | None = None


class StubOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 for tests and the offline demo.

    Args:
        reply_tokens: length of the generated default reply, in cl100k tokens.
        default_reply: fixed reply text (also settable as an attribute later).
        reply_fn: ``reply_fn(request_json) -> str`` computing each reply; wins over
            ``default_reply``, loses to a scripted ``reply``.
        reasoning_tokens: reasoning tokens reported by reasoning models (``o1``, ``o3``,
            ``o4``, ``gpt-5`` prefixes); included in ``completion_tokens`` and ``max_tokens``.
        prompt_caching: report ``cached_tokens`` for repeated chat prompt prefixes.
        context_windows: model-name prefix -> window (longest prefix wins); replaces
            :data:`DEFAULT_CONTEXT_WINDOWS`. Models matching no prefix are not checked.
        stream_usage: ``None`` follows the request's ``stream_options.include_usage``;
            ``False`` never sends usage in streams; ``True`` always does.
        stream_chunk_tokens: tokens of reply text per streamed chunk.
        latency: seconds to wait before each completion response.
        host, port: where to bind (port 0 picks a free port).
    """

    def __init__(
        self,
        *,
        reply_tokens: int = 40,
        default_reply: str | None = None,
        reply_fn: Callable[[dict[str, Any]], str] | None = None,
        reasoning_tokens: int = 0,
        prompt_caching: bool = True,
        context_windows: dict[str, int] | None = None,
        stream_usage: bool | None = None,
        stream_chunk_tokens: int = 3,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.reply_tokens, self.default_reply, self.reply_fn = reply_tokens, default_reply, reply_fn
        self.reasoning_tokens, self.prompt_caching = reasoning_tokens, prompt_caching
        self.context_windows = dict(
            DEFAULT_CONTEXT_WINDOWS if context_windows is None else context_windows
        )
        self.stream_usage, self.stream_chunk_tokens = stream_usage, max(1, stream_chunk_tokens)
        self.latency, self._host, self._port = latency, host, port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._script: deque[ScriptedResponse] = deque()
        self._cache = _tokens.PromptCache()
        self._stopping = threading.Event()
        self._httpd: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> StubOpenAIServer:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("StubOpenAIServer is already running")
        _tokens.encoding()  # load the encoding now, not during the first request
        self._stopping.clear()
        self._httpd = LocalHTTPServer((self._host, self._port), self._handle)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"StubOpenAIServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and join every thread of the server."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        httpd.join_handlers(timeout=5)

    def __enter__(self) -> StubOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("StubOpenAIServer is not running; call start() first")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, for ``base_url=`` of the OpenAI clients."""
        return f"http://{self._host}:{self.port}/v1"

    # -- scripting and observation --------------------------------------------------------
    def enqueue(self, *responses: ScriptedResponse, times: int = 1, **options: Any) -> None:
        """Queue scripted responses for the next completion requests, in order.

        Pass :class:`ScriptedResponse` objects and/or its fields as keywords
        (``enqueue(status=429)``); ``times`` repeats the keyword-built response.
        ``/v1/models`` and unknown paths never consume the queue.
        """
        items = list(responses) + [
            ScriptedResponse(**options) for _ in range(times if options else 0)
        ]
        with self._lock:
            self._script.extend(items)

    @property
    def pending(self) -> int:
        """How many scripted responses are still queued."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received since start or the last ``reset()``."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def reset(self) -> None:
        """Forget recorded requests, queued scripts and the prompt cache."""
        with self._lock:
            self._requests.clear()
            self._script.clear()
            self._cache.clear()

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _next_script(self) -> ScriptedResponse:
        with self._lock:
            return self._script.popleft() if self._script else ScriptedResponse()

    def _cached_tokens(self, model: str, stream: list[int]) -> int:
        if not self.prompt_caching:
            return 0
        with self._lock:
            return self._cache.lookup_and_store(model, stream)

    def _context_window(self, model: str) -> int | None:
        matches = [p for p in self.context_windows if model.startswith(p)]
        return self.context_windows[max(matches, key=len)] if matches else None

    # -- request handling -----------------------------------------------------------------
    def _handle(self, handler: Handler, method: str) -> None:
        """The HTTP application: record, route, answer (errors in OpenAI's shape)."""
        raw = handler.read_body()
        path = urlsplit(handler.path).path.rstrip("/")
        try:
            body, bad_json = (json.loads(raw) if raw else None), False
        except ValueError:
            body, bad_json = None, True
        rec = RecordedRequest(
            method, path, {k.lower(): v for k, v in handler.headers.items()}, body
        )
        self._record(rec)
        try:
            if bad_json:
                raise HTTPError(400, "We could not parse the JSON body of your request.")
            if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                self._complete(handler, rec, chat=path == "/v1/chat/completions")
            elif method == "GET" and path == "/v1/models":
                data = [self._model_card(m) for m in sorted(self.context_windows)]
                self._send(handler, rec, {"object": "list", "data": data})
            elif method == "GET" and path.startswith("/v1/models/"):
                model = path.removeprefix("/v1/models/")
                if self._context_window(model) is None:
                    raise HTTPError(404, f"The model '{model}' does not exist", param="model")
                self._send(handler, rec, self._model_card(model))
            else:
                raise HTTPError(404, f"Invalid URL ({method} {path})", code=None)
        except HTTPError as exc:
            script = rec.scripted or ScriptedResponse()
            wait = script.retry_after
            if wait is None and exc.status == 429:
                wait = 1.0
            headers = _payloads.retry_headers(wait)
            self._send(handler, rec, error_body(exc), script, status=exc.status, headers=headers)
        except OSError:  # the client went away: Handler drops the connection
            raise
        except Exception as exc:  # a bug here should reach the test as a 500, not a hang
            if handler.started:  # mid-response: all that can be done is to drop the line
                rec.broken = True
                handler.abort()
            else:
                error = error_body(HTTPError(500, f"stub server error: {exc!r}"))
                self._send(handler, rec, error, status=500)

    @staticmethod
    def _model_card(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 0, "owned_by": "budgetguard"}

    @staticmethod
    def _send(
        handler: Handler,
        rec: RecordedRequest,
        payload: Any,
        script: ScriptedResponse | None = None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        script = script or ScriptedResponse()
        rec.status, rec.broken = status, script.break_after is not None
        handler.send_json(
            status, payload, {**(headers or {}), **(script.headers or {})}, cut=rec.broken
        )

    def _complete(self, handler: Handler, rec: RecordedRequest, chat: bool) -> None:
        body = rec.body
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise HTTPError(400, "you must provide a model parameter", param="model")
        model, n = body["model"], body.get("n") or 1
        rec.model, rec.stream = model, bool(body.get("stream"))
        if not isinstance(n, int) or n < 1:
            raise HTTPError(400, f"{n!r} is less than the minimum of 1 - 'n'", param="n")
        if body.get("stream_options") is not None and not rec.stream:
            raise HTTPError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty array", param="messages")
            tools = body.get("tools") or body.get("functions")
            stream_tokens = _tokens.chat_prompt_stream(messages, tools, model)
            prompts = [_payloads.last_user_text(messages)]
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            try:
                prompts, stream_tokens = _tokens.legacy_prompt(body.get("prompt"))
            except ValueError as exc:
                raise HTTPError(400, str(exc), param="prompt") from None
            limit = body.get("max_tokens") or _LEGACY_DEFAULT_MAX_TOKENS
        rec.prompt_tokens = prompt_tokens = len(stream_tokens)
        script = rec.scripted = self._next_script()
        delay = self.latency if script.latency is None else script.latency
        if delay > 0 and self._stopping.wait(delay):
            raise HTTPError(503, "The stub server is shutting down.")
        if script.status is not None and script.status >= 400:
            fields = dict(script.error or {})
            raise HTTPError(script.status, fields.pop("message", None), **fields)
        self._check_context(model, prompt_tokens, limit or 0, chat)
        cached = self._cached_tokens(model, stream_tokens) if chat else 0
        reasoning = 0
        if model.startswith(REASONING_MODEL_PREFIXES):
            reasoning = (
                self.reasoning_tokens
                if script.reasoning_tokens is None
                else script.reasoning_tokens
            )
            reasoning = min(reasoning, limit) if limit else reasoning
        choices = [
            self._reply(body, text, script, limit, reasoning) for text in prompts for _ in range(n)
        ]
        rec.completion_tokens = completion = sum(c.completion_tokens for c in choices)
        rec.cached_tokens, rec.reasoning_tokens = cached, reasoning * len(choices)
        usage = _payloads.usage_body(prompt_tokens, completion, cached, rec.reasoning_tokens)
        if script.usage is not None:
            usage = _payloads.merge(usage, script.usage)
        if script.omit_usage:
            usage = OMIT
        base = _payloads.completion_base(model, chat)
        if rec.stream:
            asked = bool((body.get("stream_options") or {}).get("include_usage"))
            if not (asked if self.stream_usage is None else self.stream_usage):
                usage = OMIT
            make_events = _payloads.chat_events if chat else _payloads.legacy_events
            pieces = functools.partial(_tokens.stream_pieces, size=self.stream_chunk_tokens)
            events = list(make_events(base, choices, pieces, usage))
            rec.status = 200
            rec.broken = script.break_after is not None and script.break_after < len(events)
            handler.send_stream(events, script.headers, script.break_after)
        else:
            self._send(handler, rec, _payloads.completion_body(base, choices, usage), script)

    def _check_context(self, model: str, prompt: int, limit: int, chat: bool) -> None:
        window = self._context_window(model)
        if window is None or prompt + limit <= window:
            return
        msg = _payloads.context_length_message(window, prompt, limit, chat)
        param = "messages" if chat else "prompt"
        raise HTTPError(400, msg, param=param, code="context_length_exceeded")

    def _reply(
        self,
        body: dict[str, Any],
        prompt_text: str,
        script: ScriptedResponse,
        limit: int | None,
        reasoning: int,
    ) -> Choice:
        enc = _tokens.encoding()
        wanted_calls = script.tool_calls
        if script.reply is not None:
            text = script.reply
        elif script.tool_calls:
            text = ""
        elif self.reply_fn is not None:
            text = self.reply_fn(body)
        elif self.default_reply is not None:
            text = self.default_reply
        elif (decided := _behaviour.answer(body, prompt_text)) is not None:
            text, wanted_calls = decided.text, decided.tool_calls
        else:
            text = _tokens.generate_reply(prompt_text, self.reply_tokens)
        stops = body.get("stop")
        for stop in [stops] if isinstance(stops, str) else stops or []:
            if stop and stop in text:
                text = text[: text.index(stop)]
        finish, calls, call_tokens = "stop", None, 0
        if wanted_calls:
            finish, calls = "tool_calls", _payloads.tool_calls(wanted_calls)
            call_tokens = sum(
                _tokens.n_tokens(c["function"]["name"] + c["function"]["arguments"]) for c in calls
            )
        tokens = enc.encode(text, disallowed_special=())
        if limit is not None and len(tokens) + call_tokens + reasoning > limit:
            text = enc.decode(tokens[: max(0, limit - reasoning)])
            finish, calls, call_tokens = "length", None, 0
        used = _tokens.n_tokens(text) + call_tokens + reasoning
        return Choice(text, script.finish_reason or finish, calls, used)

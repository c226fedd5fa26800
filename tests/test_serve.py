"""serve.py: the real server in a child process on a free loopback port, used through the official
`openai` client (and raw HTTP where the client would hide what is checked): chat and completions,
streamed and not, usage, stop, n, seed, logprobs, every error code, continuous batching against lone
runs, disconnects, metrics, --watch; plus lm-evaluation-harness's local-completions against the
server and a real headless browser on the web chat."""
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    """Raw HTTP to a server at self.url (for what the official client would hide)."""
    url = ""

    def request(self, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None,
                timeout: float = 60):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                self.last_headers = r.headers
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            self.last_headers = e.headers
            return e.code, e.read().decode()

    def get(self, path: str, key: str | None = KEY):
        return self.request("GET", path, key=key, timeout=5)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, path: str, body: dict, key: str | None = KEY, started: threading.Event | None = None,
               after: int = 1, on_event=None):
        """A streamed request read event by event: (status, the `data:` payloads, JSON-parsed, "[DONE]"
        as it is); `started` is set once `after` payloads have arrived; on_event(payload) sees each."""
        req = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             **({"Authorization": f"Bearer {key}"} if key else {})})
        payloads = []
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                for line in r:
                    line = line.decode().strip()
                    if line.startswith("data: "):
                        payloads.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                        if on_event is not None:
                            on_event(payloads[-1])
                        if started is not None and len(payloads) >= after:
                            started.set()
                return r.status, payloads
        except urllib.error.HTTPError as e:
            return e.code, [json.loads(e.read().decode())]
        finally:
            if started is not None:
                started.set()  # (a request that failed early must not leave its waiter hanging)

    def metric(self, name: str, model: str = "tiny") -> float:
        text = self.get("/metrics")[1]
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f'{name}{{model="{model}"}}')))

    def wait_for_metric(self, name: str, value: float, timeout: float = 10) -> float:
        deadline = time.time() + timeout
        while (now := self.metric(name)) != value and time.time() < deadline:
            time.sleep(0.05)
        return now


class ServerProcess(Http):
    """serve.py as a user starts it; waits for /health (bounded), stops it at the end."""

    def __init__(self, *args, timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(self.port), *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited {self.proc.returncode}: {''.join(self.log)[-2000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve.py did not become healthy: {''.join(self.log)[-2000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class InProcessServer(Http):
    """serve.py's app on uvicorn in a thread of the test process: a test can then make one request's
    work fail deterministically (monkeypatch) and watch what happens to the others."""

    def __init__(self, ckpt, *flags):
        pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn (requirements.txt)")
        import uvicorn
        import serve
        args = serve.build_parser().parse_args(["--model", f"tiny={ckpt}", *map(str, flags)])
        self.server = serve.Server(args, serve.model_specs(args.model), torch.device("cpu"), torch.float32)
        self.server.load_all()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.uv = uvicorn.Server(uvicorn.Config(serve.build_app(self.server), host="127.0.0.1", port=port,
                                                log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.uv.started

    def stop(self):
        self.server.stop()
        self.uv.should_exit = True
        self.thread.join(timeout=10)


def ckpt_with_context(trained_ckpt, path: Path, context: int) -> Path:
    """The trained weights with another context length (RoPE is computed, not learned)."""
    from text_tokenizer import TextTokenizer
    from model import GPT, ModelConfig, load_checkpoint, save_checkpoint
    ck = load_checkpoint(trained_ckpt)
    m = GPT(ModelConfig.from_dict({**ck["config"], "max_seq_len": context}))
    m.load_state_dict(ck["model"])
    m.tokenizer = TextTokenizer.from_dict(ck["tokenizer"])
    save_checkpoint(path, m)
    return path


@pytest.fixture(scope="module")
def int4_bin(trained_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_bin") / "tiny-int4.bin"
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--model", str(trained_ckpt), "--output", str(out),
                        "--strategy", "int4", "--group-size", "32", "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def server(trained_ckpt, int4_bin):
    pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn (requirements.txt)")
    s = ServerProcess("--model", f"tiny={trained_ckpt}", "--model", int4_bin, "--api-key", KEY, "--max-batch", 8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the official client: pip install openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny(trained_ckpt):
    from model import load_model
    return load_model(trained_ckpt)


def offline_reply(m, prompt_ids, max_new, stop_ids) -> str:
    """What the model itself says, greedy, through engine.generate_samples (generate.py's path)."""
    from engine import generate_samples
    rows = generate_samples(m, prompt_ids, max_new, temperature=0.0, stop_ids=stop_ids)
    return m.tokenizer.decode(rows[0])


def chat_ids(m, text):
    return m.tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]


# ----------------------------------------------------------------------------------------------
# models, chat, completions

def test_models_list_describes_each_model(client, trained_ckpt, int4_bin, tiny):
    from model import count_params
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny-int4"}
    t, q = models["tiny"].model_dump(), models["tiny-int4"].model_dump()
    assert t["parameters"] == q["parameters"] == count_params(tiny.config)
    assert t["context_length"] == q["context_length"] == tiny.config.max_seq_len
    assert t["quantization"] == "none" and "int4" in q["quantization"]
    assert t["file_bytes"] == trained_ckpt.stat().st_size and q["file_bytes"] == int4_bin.stat().st_size
    assert t["chat_trained"] is False


def test_chat_is_the_models_own_greedy_reply(client, tiny):
    from text_tokenizer import chat_stop_ids
    text = "The function returns"
    expected = offline_reply(tiny, chat_ids(tiny, text), 24, chat_stop_ids(tiny.tokenizer))
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=24,
                                       temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == expected
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.usage.prompt_tokens == len(chat_ids(tiny, text)) and r.usage.total_tokens == \
        r.usage.prompt_tokens + r.usage.completion_tokens
    assert c.finish_reason in ("stop", "length") and (c.finish_reason == "length") == (r.usage.completion_tokens == 24)
    assert r.system_fingerprint.startswith("fishai-") and r.system_fingerprint.endswith("-none")
    # max_completion_tokens is the newer name of the same limit
    r2 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                        max_completion_tokens=24, temperature=0)
    assert r2.choices[0].message.content == expected


def test_streaming_gives_the_same_text_with_one_finish_and_usage(client, tiny):
    msgs = [{"role": "user", "content": "Python 的字典 🐍 is"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # every piece is whole UTF-8 text: no replacement character the whole reply does not have
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices) or "\ufffd" in text


def test_completions_text_logprobs_and_echo(client, tiny):
    import scoring
    prompt = "The module provides"
    ids = tiny.tokenizer.encode(prompt)
    expected = offline_reply(tiny, ids, 12, [tiny.tokenizer.eos_id])
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text == expected and plain.object == "text_completion"
    assert plain.usage.prompt_tokens == len(ids)
    # echo + logprobs (what lm-eval's local-completions sends): the prompt's log-probabilities
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    lm = scoring.load_lm(tiny.source)
    for i in range(1, len(ids)):
        (ll, greedy), = scoring.loglikelihood(lm, [(ids[:i], [ids[i]])], progress=False)
        assert abs(lp.token_logprobs[i] - ll) < 1e-4
        assert greedy == (lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6)
    # streamed: the same text in pieces, then one finish_reason and the usage
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # a batch of token-id prompts: one choice each, in order
    r = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == len(ids) + 2


def test_stop_strings_cut_and_are_never_echoed(client, tiny):
    prompt = "The function returns"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    assert len(stop.strip()) >= 2, full
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    c = r.choices[0]
    assert c.text == full[:full.index(stop)] and stop not in c.text and c.finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=30, temperature=0, stream=True, stop=stop[:2]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stop[:2] not in text


def test_n_seed_and_sampling(client):
    msgs = [{"role": "user", "content": "Write"}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=1.0, n=2, seed=7)
    b = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=1.0, n=2, seed=7)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seed: reproducible
    assert a.choices[0].message.content != a.choices[1].message.content  # the n choices differ
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and a.usage.completion_tokens <= 32
    g = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, n=2)
    assert g.choices[0].message.content == g.choices[1].message.content  # greedy: the same reply twice


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5  # greedy: the chosen token is the top one


def test_the_quantized_file_serves_on_its_kernels(client, int4_bin):
    from model import load_model
    q = load_model(int4_bin)
    ids = q.tokenizer.encode("The module")
    r = client.completions.create(model="tiny-int4", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == offline_reply(q, ids, 10, [q.tokenizer.eos_id])
    assert r.system_fingerprint.endswith("int4") or "int4" in r.system_fingerprint


# ----------------------------------------------------------------------------------------------
# errors: the OpenAI error body, never a 500 for a user's mistake, and the server goes on

BAD_REQUESTS = [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    # sampling fields out of their finite, sane range: refused before the request joins the batch
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": float("inf")}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": float("nan")}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}, 400, "seed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": -1}, 400, "seed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": float("-inf")}, 400,
     "presence_penalty"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 3}, 400,
     "frequency_penalty"),
    ({"model": "tiny", "prompt": "x", "temperature": float("nan")}, 400, "temperature"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS,
                         ids=[f"{s}-{p}-{i}" for i, (_, s, p) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_the_openai_error_body(server, body, status, param):
    code, text = server.post("/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert code == status and err["param"] == param and set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in text
    assert server.get("/health")[0] == 200  # and the server still answers


def test_malformed_json_context_overflow_auth_and_routes(server, client, tiny):
    openai = pytest.importorskip("openai")
    code, text = server.post("/v1/chat/completions", raw=b"{not json")
    assert code == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    long_text = "word " * 400
    n_prompt = len(chat_ids(tiny, long_text))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}], max_tokens=10)
    msg = e.value.body["message"]
    assert f"the prompt ({n_prompt} tokens) plus max_tokens (10)" in msg
    assert f"{n_prompt + 10 - tiny.config.max_seq_len} over the model's context of {tiny.config.max_seq_len}" in msg
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    code, text = server.post("/v1/chat/completions", {"model": "tiny", "messages": []}, key=None)
    assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert server.post("/v1/completions", {"model": "tiny", "prompt": "x"}, key="wrong")[0] == 401
    assert server.get("/health", key=None)[0] == 200 and server.get("/metrics", key=None)[0] == 200  # public
    code, text = server.get("/v1/nowhere")
    assert code == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    code, text = server.post("/v1/completions", {"model": "tiny", "prompt": [99999]})
    assert code == 400 and json.loads(text)["error"]["param"] == "prompt"
    # unknown and unsupported fields are accepted and ignored
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       presence_penalty=0.5, user="me", extra_body={"whatever": [1]})
    assert r.usage.completion_tokens <= 2
    code, _ = server.post("/v1/completions", raw=b"{" + b'"a": "' + b"x" * (1100 * 1024) + b'"}')
    assert code == 413


# ----------------------------------------------------------------------------------------------
# continuous batching, disconnects, metrics

def test_sixteen_parallel_requests_equal_their_lone_runs(client):
    prompts = [f"Request {i}: the" for i in range(16)]
    lone = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=20,
                                           temperature=0).choices[0].message.content for p in prompts]
    results = [None] * 16

    def run(i):
        results[i] = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=20, temperature=0).choices[0].message.content
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    seconds = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(results, lone))
    print(f"16 parallel requests: {same}/16 identical to their lone runs, {16 * 20 / seconds:.0f} tokens/s aggregate")
    assert same == 16


def test_health_answers_while_streams_run_and_a_disconnect_frees_the_row(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell"}], "max_tokens": 100,
            "temperature": 1.0, "stream": True}
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    def completed():
        text = server.get("/metrics")[1]
        return float(next((line.split()[-1] for line in text.splitlines()
                           if line.startswith('fishai_completion_tokens_total{model="tiny"}')), 0))
    before = completed()
    streams = [urllib.request.urlopen(req, timeout=30) for _ in range(8)]
    for s in streams:
        s.readline()  # the first event has arrived: all 8 are decoding
    t0 = time.perf_counter()
    assert server.get("/health")[0] == 200 and time.perf_counter() - t0 < 2.0
    for s in streams:
        s.close()  # the clients go away mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        metrics = server.get("/metrics")[1]
        if 'fishai_active_requests{model="tiny"} 0.0' in metrics:
            break
        time.sleep(0.1)
    assert 'fishai_active_requests{model="tiny"} 0.0' in metrics
    assert completed() - before < 8 * 100 / 2  # the abandoned streams stopped early: their rows were freed


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    code, text = server.get("/metrics", key=None)
    assert code == 200
    for name in ("fishai_requests_total", "fishai_prompt_tokens_total", "fishai_completion_tokens_total",
                 "fishai_queue_depth", "fishai_time_to_first_token_seconds_bucket",
                 "fishai_decode_tokens_per_second"):
        assert name in text, name
    assert 'fishai_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_a_full_queue_answers_429(trained_ckpt):
    s = ServerProcess("--model", f"tiny={trained_ckpt}", "--max-batch", 1, "--max-queue", 1)
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "temperature": 1.0}
        codes, retry_after = [], []

        def post():
            req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    codes.append(r.status)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
                retry_after.append(e.headers.get("Retry-After"))
        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert 429 in codes and 200 in codes, codes
        assert retry_after and all(v is not None and int(v) >= 1 for v in retry_after), retry_after
        assert s.get("/health")[0] == 200
    finally:
        s.stop()


def test_watch_reloads_a_replaced_checkpoint(trained_ckpt, tiny_ckpt, tmp_path):
    path = tmp_path / "fishai-best.pt"
    shutil.copy(trained_ckpt, path)
    s = ServerProcess("--model", path, "--watch")
    try:
        body = {"model": "fishai-best", "prompt": "The module", "max_tokens": 8, "temperature": 0}
        before = json.loads(s.post("/v1/completions", body)[1])
        tmp = tmp_path / "new.pt"
        shutil.copy(tiny_ckpt, tmp)
        os.replace(tmp, path)  # what train.py does when it writes a new best
        deadline = time.time() + 30
        while time.time() < deadline:
            after = json.loads(s.post("/v1/completions", body)[1])
            if after["system_fingerprint"] != before["system_fingerprint"]:
                break
            time.sleep(0.5)
        assert after["system_fingerprint"] != before["system_fingerprint"]
        from model import load_model
        m = load_model(tiny_ckpt)
        assert after["choices"][0]["text"] == offline_reply(m, m.tokenizer.encode("The module"), 8,
                                                            [m.tokenizer.eos_id])
    finally:
        s.stop()


def test_bad_command_lines_are_one_line_errors(tmp_path):
    for args, needle in ((["--model", tmp_path / "none.pt"], "--model"), (["--port", "0"], "--port"),
                         (["--model", "x.pt", "--prefill-chunk", "0"], "--prefill-chunk")):
        r = subprocess.run([sys.executable, str(ROOT / "serve.py"), *map(str, args)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error:") and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: " in r.stderr and "bad.pt" in r.stderr


def test_a_folder_that_is_not_a_model_never_says_serving(tmp_path):
    """Issue 26: `serve.py --model runs/quick/` (a run folder, not a model) said "serving ... on
    http://..." and then failed to load; now it fails with one line and never claims to serve."""
    run = tmp_path / "quick"
    run.mkdir()
    (run / "report.md").write_text("# a quick_train report, not a model\n")
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", str(run), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "serving" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "quick" in errors[0] and "Traceback" not in out, out


def test_serving_is_said_once_the_models_are_loaded(server):
    deadline = time.time() + 10
    while time.time() < deadline and not any("serving " in line for line in server.log):
        time.sleep(0.1)
    lines = list(server.log)
    said = [i for i, line in enumerate(lines) if "serving tiny, tiny-int4 on http://127.0.0.1:" in line]
    loaded = [i for i, line in enumerate(lines) if " loaded in " in line]
    assert len(said) == 1 and len(loaded) == 2 and said[0] > max(loaded), "".join(lines)
    # the load line says which kernels a quantized model runs on (and why torch's, where it does)
    int4 = next(lines[i] for i in loaded if "model tiny-int4:" in lines[i])
    plain = next(lines[i] for i in loaded if "model tiny:" in lines[i])
    assert f"(int4 on {cpu_kernels.status()}, " in int4 and "(none, " in plain, "".join(lines)


def test_health_is_503_while_loading(trained_ckpt):
    """In-process: the app answers before its models are loaded."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient
    import serve
    args = serve.build_parser().parse_args(["--model", str(trained_ckpt)])
    srv = serve.Server(args, serve.model_specs(args.model), torch.device("cpu"), torch.float32)
    app = serve.build_app(srv)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        srv.load_all()
        assert c.get("/health").json() == {"status": "ok", "models": [Path(trained_ckpt).stem]}
        page = c.get("/")
        assert page.status_code == 200 and "FishAI chat" in page.text and "/v1/chat/completions" in page.text


# ----------------------------------------------------------------------------------------------
# isolation: a bad or failing request ends alone, the server and its gauges stay true

def test_error_messages_read_well(server):
    cases = [({"n": 0}, "'n' must be at least 1 (got 0)"),
             ({"max_tokens": "many"}, "'max_tokens' must be an integer (got \"many\")"),
             ({"temperature": 3}, "'temperature' must be between 0 and 2 (got 3)"),
             ({"stream": "yes"}, "'stream' must be a boolean (got \"yes\")"),
             ({"stream_options": 1, "stream": True}, "'stream_options' must be an object (got 1)"),
             ({"temperature": float("nan")}, "'temperature' must be a finite number (got nan)"),
             ({"seed": 2**70}, f"'seed' must be between 0 and {2**64 - 1} (got {2**70})")]
    for fields, message in cases:
        code, text = server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                          **fields})
        assert code == 400 and json.loads(text)["error"]["message"] == message, text


def test_a_tiny_temperature_decodes_greedily(client):
    msgs = [{"role": "user", "content": "The function returns"}]
    greedy = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    for t in (1e-300, 5e-324, 1e-4):  # dividing the logits by these would overflow to inf/NaN
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=t)
        assert r.choices[0].message.content == greedy.choices[0].message.content


def _run_all(fns: dict) -> dict:
    """Run the callables at the same time; their results by name."""
    out = {}
    threads = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f())) for k, f in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _assert_innocent(res, lone: dict):
    """The innocent requests finished as they do alone: 200, their own text, a finish_reason, [DONE]."""
    for k, text in lone.items():
        if k == "stream":
            code, payloads = res[k]
            assert code == 200 and payloads[-1] == "[DONE]" and not any("error" in p for p in payloads[:-1]), payloads
            assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[:-1] if p["choices"]) == text
            assert [p["choices"][0]["finish_reason"] for p in payloads[:-1] if p["choices"]][-1] in ("stop", "length")
        else:
            code, body = res[k]
            c = json.loads(body)["choices"][0]
            assert code == 200 and c["message"]["content"] == text and c["finish_reason"] in ("stop", "length"), body


INNOCENT = {f"plain{i}": f"Request {i}: the" for i in range(3)} | {"stream": "Tell me"}


def _innocent_calls(s: Http, lone: dict | None = None) -> dict:
    def body(k):
        return {"model": "tiny", "messages": [{"role": "user", "content": INNOCENT[k]}], "max_tokens": 20,
                "temperature": 0}
    calls = {k: (lambda k=k: s.post("/v1/chat/completions", body(k))) for k in INNOCENT if k != "stream"}
    calls["stream"] = lambda: s.stream("/v1/chat/completions", body("stream"))
    if lone is None:  # the lone runs, one after another
        res = {k: f() for k, f in calls.items()}
        return {k: (json.loads(res[k][1])["choices"][0]["message"]["content"] if k != "stream" else
                    "".join(p["choices"][0]["delta"].get("content") or "" for p in res[k][1][:-1] if p["choices"]))
                for k in res}
    return calls


def test_a_stream_that_breaks_after_its_headers_ends_with_an_error_event():
    """Once a stream's 200 is sent, a failure (a request error or a bug) goes out as an OpenAI error
    event followed by [DONE]: the client is told, the stream is never just cut."""
    pytest.importorskip("fastapi")
    import asyncio
    import serve

    async def pieces(exc):
        yield "data: first\n\n"
        raise exc

    async def collect(exc):
        return [p async for p in serve._ending_with_error_event(pieces(exc))]
    for exc, message, kind in ((serve.ServeError(500, "decoding failed: boom", kind="server_error"),
                                "decoding failed: boom", "server_error"),
                               (KeyError("x"), "internal error: KeyError", "server_error")):
        out = asyncio.run(collect(exc))
        assert out[0] == "data: first\n\n" and out[-1] == "data: [DONE]\n\n" and len(out) == 3
        err = json.loads(out[1][len("data: "):])["error"]
        assert err["message"] == message and err["type"] == kind


@pytest.mark.parametrize("param,value,status", [("temperature", float("nan"), 400), ("temperature", float("inf"), 400),
                                                ("seed", 2**70, 400), ("temperature", 1e-300, 200)],
                         ids=["nan", "infinity", "seed-2**70", "subnormal-temperature"])
def test_a_bad_request_is_answered_alone_while_innocent_requests_finish(server, param, value, status):
    """A NaN or infinite temperature or a seed past 2**64-1 is refused (400) before it joins the batch;
    a subnormal temperature decodes greedily (200); the requests decoding beside it are untouched."""
    lone = _innocent_calls(server)
    bad = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, param: value}
    res = _run_all({**_innocent_calls(server, lone), "bad": lambda: server.post("/v1/chat/completions", bad),
                    "bad_stream": lambda: server.stream("/v1/chat/completions", bad)})
    assert res["bad"][0] == status and res["bad_stream"][0] == status, (res["bad"], res["bad_stream"])
    if status == 400:
        assert json.loads(res["bad"][1])["error"]["param"] == param
        assert res["bad_stream"][1][0]["error"]["param"] == param
    else:
        assert res["bad_stream"][1][-1] == "[DONE]" and json.loads(res["bad"][1])["choices"][0]["finish_reason"]
    _assert_innocent(res, lone)
    assert server.wait_for_metric("fishai_active_requests", 0.0) == 0.0


def test_a_request_that_fails_in_its_row_ends_alone(trained_ckpt, monkeypatch):
    """A request whose sampling raises (marked by its temperature: 0.25 fails at its second token,
    inside a decode step; 0.75 at its first, inside its prefill): streamed, it gets an error event
    and [DONE] after its first tokens; not streamed, a 500 with the error body. The others in the
    same batch finish with the text they give alone, and the gauges come back to 0."""
    import serve
    real, calls = serve.sample_next, collections.Counter()

    def sample_next(logits, temperature, top_k, top_p, generator):
        calls[id(generator)] += 1
        if temperature == 0.25 and calls[id(generator)] >= 2 or temperature == 0.75:
            raise RuntimeError("logits processing failed")
        # (the marked requests' first token: greedy, so that it is never a stop token that ends them early)
        return real(logits, 0.0 if temperature == 0.25 else temperature, top_k, top_p, generator)
    monkeypatch.setattr(serve, "sample_next", sample_next)
    s = InProcessServer(trained_ckpt)
    try:
        lone = _innocent_calls(s)

        def bad(t, stream):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "The function returns"}],
                    "max_tokens": 20, "temperature": t}
            return s.stream("/v1/chat/completions", body) if stream else s.post("/v1/chat/completions", body)
        res = _run_all({**_innocent_calls(s, lone), **{f"bad{t}{st}": (lambda t=t, st=st: bad(t, st))
                                                      for t in (0.25, 0.75) for st in (True, False)}})
        _assert_innocent(res, lone)
        for t in (0.25, 0.75):
            code, payloads = res[f"bad{t}True"]
            assert code == 200 and payloads[-1] == "[DONE]", payloads
            err = payloads[-2]["error"]
            assert "logits processing failed" in err["message"] and err["type"] == "server_error", payloads
            assert not any(p.get("choices") and p["choices"][0]["finish_reason"] for p in payloads[:-2])
            if t == 0.25:  # its first token went out before the failure
                assert sum(bool(p["choices"] and p["choices"][0]["delta"].get("content")) for p in payloads[:-2]) >= 1
            code, body = res[f"bad{t}False"]
            assert code == 500 and "logits processing failed" in json.loads(body)["error"]["message"], body
        assert s.wait_for_metric("fishai_active_requests", 0.0) == 0.0
        assert s.wait_for_metric("fishai_queue_depth", 0.0) == 0.0
        assert s.get("/health")[0] == 200
        assert _innocent_calls(s) == lone  # and the server goes on as before
    finally:
        s.stop()


class _StepControl:
    """The server's decode steps (engine.Engine.step with each row at its own position), slowed
    down and made to fail on demand: a test's hand on what a real failure would do (a CUDA error,
    an out-of-memory in one step). Prefill calls pass through."""

    def __init__(self, monkeypatch):
        from engine import Engine
        real, self.slow, self.fail = Engine.step, 0.0, None

        def step(eng, tokens, start, row=0, last_only=True):
            if torch.is_tensor(start):  # a decode step of the batch (a prefill starts at an int)
                time.sleep(self.slow)
                fail, self.fail = self.fail, None
                if fail is not None:
                    raise fail
            return real(eng, tokens, start, row, last_only)
        monkeypatch.setattr(Engine, "step", step)


class EngineKilled(BaseException):
    """What no `except Exception` catches: the engine thread itself ends."""


def _long_streams(s: Http, k: int):
    """k slow greedy streams that have started: (threads, results by index)."""
    started, results = [threading.Event() for _ in range(k)], {}
    body = {"model": "tiny", "prompt": "The function returns", "max_tokens": 100, "temperature": 0}

    def run(i):
        results[i] = s.stream("/v1/completions", body, started=started[i], after=2)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    return threads, results


def _ended_with_error(result, needle: str) -> None:
    code, payloads = result
    assert code == 200 and payloads[-1] == "[DONE]" and needle in payloads[-2]["error"]["message"], payloads[-3:]
    assert not any(p.get("choices") and p["choices"][0]["finish_reason"] for p in payloads[:-2])


def test_a_failed_decode_step_ends_only_its_requests(trained_ckpt, monkeypatch):
    ctl = _StepControl(monkeypatch)
    s = InProcessServer(trained_ckpt, "--max-batch", 2)
    try:
        queued = {"model": "tiny", "messages": [{"role": "user", "content": "Write"}], "max_tokens": 10,
                  "temperature": 0}
        alone = s.post("/v1/chat/completions", queued)
        ctl.slow = 0.02  # the two streams hold both rows for seconds
        threads, results = _long_streams(s, 2)
        later = {}
        waiter = threading.Thread(target=lambda: later.setdefault("r", s.post("/v1/chat/completions", queued)))
        waiter.start()
        assert s.wait_for_metric("fishai_queue_depth", 1.0) == 1.0  # it waits for a row
        ctl.fail = RuntimeError("device lost")
        for t in threads + [waiter]:
            t.join(timeout=60)
        for i in range(2):
            _ended_with_error(results[i], "decoding failed: RuntimeError: device lost")
        # the queued request was not in the failed step: it runs next, as it does alone
        assert later["r"][0] == 200 and json.loads(later["r"][1])["choices"] == json.loads(alone[1])["choices"]
        assert s.wait_for_metric("fishai_active_requests", 0.0) == 0.0
        assert s.wait_for_metric("fishai_queue_depth", 0.0) == 0.0
    finally:
        s.stop()


def test_a_dead_engine_thread_turns_health_503(trained_ckpt, monkeypatch):
    ctl = _StepControl(monkeypatch)
    s = InProcessServer(trained_ckpt)
    try:
        ctl.slow = 0.02
        threads, results = _long_streams(s, 1)
        assert s.get("/health")[0] == 200
        ctl.fail = EngineKilled()
        threads[0].join(timeout=60)
        _ended_with_error(results[0], "the decoding thread died: EngineKilled")
        code, text = s.get("/health")
        assert code == 503 and json.loads(text)["dead_engines"] == ["tiny"]
        code, text = s.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert code == 503 and "decoding thread died" in json.loads(text)["error"]["message"]
        assert s.wait_for_metric("fishai_active_requests", 0.0) == 0.0
    finally:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_streams_with_an_error_event_and_exits(trained_ckpt, tmp_path, sig):
    """SIGTERM (a supervisor) or Ctrl-C with streams in flight: each gets an error event and [DONE],
    new connections are refused, and the process is gone within 5 s."""
    ckpt = ckpt_with_context(trained_ckpt, tmp_path / "tiny-2048.pt", 2048)
    s = ServerProcess("--model", f"tiny={ckpt}")
    try:
        results = {}
        body = {"model": "tiny", "prompt": "The function returns", "max_tokens": 2000, "temperature": 0}
        started = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, s.stream("/v1/completions", body, key=None, started=started[i], after=3))) for i in range(4)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        t0 = time.perf_counter()
        s.proc.send_signal(sig)
        rc = s.proc.wait(timeout=10)
        elapsed = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=10)
        assert elapsed < 5, elapsed
        assert rc == (130 if sig == signal.SIGINT else -signal.SIGTERM), (rc, "".join(s.log)[-2000:])
        for i in range(4):
            _ended_with_error(results[i], "the server is shutting down")
        with pytest.raises(OSError):
            s.get("/health")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def _steps_during_a_long_prefill(s: Http, long_prompt: list[int]) -> tuple[int, dict]:
    """Tokens a running stream receives between a long prompt's arrival and its first token; and
    the long request's completion (echo + logprobs)."""
    log, started = [], threading.Event()
    body = {"model": "tiny", "prompt": "The function returns", "max_tokens": 400, "temperature": 0}
    running = threading.Thread(target=lambda: s.stream("/v1/completions", body, key=None, started=started, after=3,
                                                       on_event=lambda p: log.append("S")))
    running.start()
    assert started.wait(30)
    log.append("sent")
    long_body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 4, "temperature": 0}
    s.stream("/v1/completions", long_body, key=None, on_event=lambda p: log.append("L") if p != "[DONE]" else None)
    running.join(timeout=60)
    first = log.index("L", log.index("sent"))
    code, text = s.post("/v1/completions", {**long_body, "echo": True, "logprobs": 0}, key=None)
    choice = json.loads(text)["choices"][0]
    assert code == 200, text
    return log[log.index("sent"):first].count("S"), {"text": choice["text"],
                                                     "logprobs": choice["logprobs"]["token_logprobs"]}


def _long_prompt_model(trained_ckpt, tmp_path) -> tuple:
    """The trained tiny model with a 2,048-token context, and a 1,900-token prompt of real text."""
    from model import load_model
    ckpt = ckpt_with_context(trained_ckpt, tmp_path / "tiny-2048.pt", 2048)
    line = load_model(ckpt).tokenizer.encode("The function returns a list of the values in the file, then the next one. ")
    return ckpt, (line * (1900 // len(line) + 1))[:1900]


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(trained_ckpt, tmp_path):
    """A 1,900-token prompt arriving while a stream runs: with --prefill-chunk 64 the stream gets a
    token between each of its ~30 chunks instead of waiting for the whole prefill, and the chunked
    prefill gives the same prompt log-probabilities and greedy reply as one whole prefill."""
    ckpt, long_prompt = _long_prompt_model(trained_ckpt, tmp_path)
    results = {}
    for chunk in (64, 4096):
        s = InProcessServer(ckpt, "--prefill-chunk", chunk, "--prefill-stall-steps", 0)  # the pieces as given
        try:
            results[chunk] = _steps_during_a_long_prefill(s, long_prompt)
        finally:
            s.stop()
    (chunked_steps, chunked), (whole_steps, whole) = results[64], results[4096]
    print(f"a running stream's tokens during a 1,900-token prefill: {chunked_steps} in chunks of 64, "
          f"{whole_steps} in one piece")
    # (some tokens reach the stream while the long request travels and is checked, before its
    # prefill starts, in both runs alike: the more, the busier the machine; the ~30 pieces add ~30)
    assert chunked_steps >= 15 and chunked_steps >= whole_steps + 12, (chunked_steps, whole_steps)
    assert chunked["text"] == whole["text"] and len(chunked["logprobs"]) == len(long_prompt) + 4
    assert chunked["logprobs"][0] is None and whole["logprobs"][0] is None
    assert chunked["logprobs"][1:] == pytest.approx(whole["logprobs"][1:], abs=1e-4)


# ----------------------------------------------------------------------------------------------
# beyond the peers: the served model scores what the offline model scores

SERVED_HARNESS = '''
import json, sys
cfg = json.loads(sys.argv[1])
import lm_eval
from lm_eval.tasks import TaskManager
args = (f"model={cfg['name']},base_url={cfg['url']}/v1/completions,tokenizer={cfg['tokenizer']},"
        "tokenizer_backend=huggingface,max_length=1024,num_concurrent=1,max_retries=1")
out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=cfg["tasks"],
                              task_manager=TaskManager(include_path=cfg["include"], include_defaults=False),
                              num_fewshot=0, limit=cfg["limit"], log_samples=True)
json.dump({"results": out["results"], "samples": out["samples"]}, open(cfg["out"], "w"), default=str)
'''


def test_lm_eval_over_http_gives_evaluate_pys_loglikelihoods(trained_ckpt, tiny_tokenizer_dir, shared_data, tmp_path):
    """lm-evaluation-harness 0.4.13's local-completions against serve.py (echo + logprobs), HellaSwag and
    0-shot MMLU: per document the same log-likelihoods as evaluate.py offline on the same weights."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    if lm_eval.__version__ != "0.4.13":
        pytest.skip(f"checked against lm-eval 0.4.13; {lm_eval.__version__} is installed")
    pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra: pip install 'lm-eval[api]==0.4.13'")
    from test_evaluate import PEER_MMLU, _our_data_dir, _peer_task_yamls
    # a 1024-token context: no document is cut, so both sides score the same tokens
    long_ckpt = ckpt_with_context(trained_ckpt, tmp_path / "tiny-1024.pt", 1024)
    include = _peer_task_yamls(tmp_path, shared_data, Path(lm_eval.__file__).parent / "tasks")
    limit, subjects = 4, PEER_MMLU[:2]
    s = ServerProcess("--model", f"tiny={long_ckpt}")
    try:
        cfg = {"name": "tiny", "url": s.url, "tokenizer": str(tiny_tokenizer_dir), "include": str(include),
               "limit": limit, "out": str(tmp_path / "harness.json"),
               "tasks": ["peer_hellaswag"] + [f"peer_mmlu_{x}" for x in subjects]}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf_home"), "OPENAI_API_KEY": "unused", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-c", SERVED_HARNESS, json.dumps(cfg)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        s.stop()
    harness = json.loads((tmp_path / "harness.json").read_text())
    import evaluate as ev
    data = _our_data_dir(tmp_path, shared_data)
    log = tmp_path / "ours.jsonl"
    assert ev.main(["--model", str(long_ckpt), "--benchmark", "hellaswag,mmlu", "--subjects", ",".join(subjects),
                    "--num-fewshot", "0", "--data-dir", str(data), "--limit", str(limit), "--device", "cpu",
                    "--log-samples", str(log), "--quiet"]) == 0
    ours = [json.loads(line) for line in log.read_text().splitlines()]
    compared = 0
    for task, rows in (("peer_hellaswag", [r for r in ours if r["task"] == "hellaswag"]),
                       *((f"peer_mmlu_{x}", [r for r in ours if r.get("subject") == x]) for x in subjects)):
        theirs = sorted(harness["samples"][task], key=lambda r: r["doc_id"])
        assert len(theirs) == len(rows) == limit
        for t, mine in zip(theirs, rows):
            assert [a for a in t["arguments"]] == [[mine["prompt"], c] for c in mine["choices"]]
            assert [r[0][0] for r in t["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
            compared += len(mine["choices"])
    assert compared == 3 * limit * 4


# ----------------------------------------------------------------------------------------------
# the web chat in a real headless browser

def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (drives the browser)")
    chrome, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no Chromium/ChromeDriver installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={os.path.join(os.environ.get('TMPDIR', '/tmp'), 'fishai-chrome')}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_web_chat_streams_the_apis_reply_in_a_real_browser(server, client):
    browser = _browser()
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "HTTP 401" in b.find_element(By.ID, "error").text)  # the server wants a key
        browser.find_element(By.ID, "api-key").send_keys(KEY + "\t")  # (the change event lists the models)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
        Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
        assert "never chat-trained" in browser.find_element(By.ID, "notice").text
        for field, value in (("temperature", "0"), ("max-tokens", "20")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        shown = browser.find_element(By.CSS_SELECTOR, ".assistant").get_attribute("textContent")
        api = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                             max_tokens=20, temperature=0).choices[0].message.content
        assert shown == api and shown
        assert "tokens/s" in browser.find_element(By.ID, "speed").text
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
    finally:
        browser.quit()


def test_web_chat_keeps_a_long_conversation_in_a_small_context(trained_ckpt, tmp_path):
    """The main job's tiny model has a 256-token context. With max tokens left blank each reply gets
    what the context has left after the conversation; when the conversation outgrows the context,
    its oldest turns are left out (greyed, with a note on the page) instead of the send failing.
    Three turns in a real browser, each reply the API's own reply to what the page sent."""
    browser = _browser()
    ckpt = ckpt_with_context(trained_ckpt, tmp_path / "tiny-256.pt", 256)
    s = ServerProcess("--model", f"tiny={ckpt}")
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 1)
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == ""  # blank: what fits
        el = browser.find_element(By.ID, "temperature")
        el.clear()
        el.send_keys("0")
        # about 100 tokens a turn: three turns cannot fit in 256 tokens, whatever the replies
        line = "The function returns a list of the values in the file, then the next one. "
        turns = [f"{start} {line * 3}".strip() for start in ("Hello there.", "And then?", "Write it again.")]
        for n, text in enumerate(turns, 1):
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")) == n)
            assert browser.find_element(By.ID, "error").text == ""
            shown = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("textContent")
            sent = browser.execute_script("return history.slice(0, -1).map((m) => ({role: m.role, content: m.content}))")
            assert sent[-1] == {"role": "user", "content": text}
            code, body = s.post("/v1/chat/completions", {"model": "tiny", "messages": sent, "temperature": 0}, key=None)
            api = json.loads(body)
            assert code == 200 and shown == api["choices"][0]["message"]["content"] and shown
            usage = api["usage"]  # no max_tokens: the reply may use all the context the prompt leaves
            assert usage["total_tokens"] == 256 or api["choices"][0]["finish_reason"] == "stop", usage
        note = browser.find_element(By.ID, "context-note")
        assert note.is_displayed() and "left out" in note.text and "context of 256 tokens" in note.text, note.text
        dropped = browser.find_elements(By.CSS_SELECTOR, ".msg.dropped")
        kept = browser.execute_script("return history.length")
        assert dropped and len(dropped) + kept == 2 * len(turns)
        assert dropped[0].get_attribute("textContent") == turns[0]  # the oldest turn went first
    finally:
        browser.quit()
        s.stop()


def _long_prefill_pieces(calls: list, n: int) -> list:
    """From Engine.step calls recorded as ("step",) or ("piece", start, tokens): the first prefill of
    an n-token prompt, as [(its piece's tokens, decode steps run since the piece before)]."""
    pieces, steps, at = [], 0, 0
    for c in calls:
        if c[0] == "step":
            steps += 1
        elif c[1] == 0 or c[1] == at:  # a prompt's first piece (another prompt's starts over), or its next
            pieces = pieces if c[1] else []
            pieces.append((c[2], steps if c[1] else 0))
            at, steps = c[1] + c[2], 0
            if at == n:
                return pieces
    raise AssertionError(f"no prefill of {n} tokens in {calls[:20]}...")


def test_a_long_prompt_is_prefilled_in_pieces_sized_by_the_decode_steps(trained_ckpt, tmp_path, monkeypatch):
    """--prefill-stall-steps (3 here): while a stream runs, the prefill piece of a turn is held to
    about 3 of its usual turns' time, measured as the server runs (growing at most 2x a turn); so
    even with --prefill-chunk 4096 a 1,900-token prompt is prefilled in pieces with the running
    stream's decode steps between them (with 0: in one piece), and the reply is the same."""
    from engine import Engine
    ckpt, long_prompt = _long_prompt_model(trained_ckpt, tmp_path)
    calls, real = [], Engine.step

    def spy(eng, tokens, start, row=0, last_only=True):
        calls.append(("step",) if torch.is_tensor(start) else ("piece", int(start), tokens.shape[1]))
        return real(eng, tokens, start, row, last_only)
    monkeypatch.setattr(Engine, "step", spy)
    results = {}
    for stall in (3, 0):
        calls.clear()
        s = InProcessServer(ckpt, "--prefill-chunk", 4096, "--prefill-stall-steps", stall)
        try:
            _, reply = _steps_during_a_long_prefill(s, long_prompt)
            results[stall] = reply, _long_prefill_pieces(calls, len(long_prompt))
        finally:
            s.stop()
    (paced, paced_pieces), (whole, whole_pieces) = results[3], results[0]
    assert whole_pieces == [(len(long_prompt), 0)]
    assert len(paced_pieces) >= 3 and all(steps >= 1 for _, steps in paced_pieces[1:]), paced_pieces
    assert paced["text"] == whole["text"]
    assert paced["logprobs"][1:] == pytest.approx(whole["logprobs"][1:], abs=1e-4)


def _long_prompt_bin(trained_ckpt, tmp_path) -> tuple:
    """_long_prompt_model's model as an int4 .bin (on FishAI's CPU kernels: skips where they do not run)."""
    import cpu_kernels
    import quantize
    if not cpu_kernels.available():
        pytest.skip(f"FishAI's CPU kernels do not run here: {cpu_kernels.why()}")
    ckpt, long_prompt = _long_prompt_model(trained_ckpt, tmp_path)
    path = tmp_path / "long-int4.bin"
    assert quantize.main(["--model", str(ckpt), "--output", str(path), "--strategy", "int4", "--quiet"]) == 0
    return path, long_prompt


def _mixed(rows) -> bool:
    """Whether an Engine.step_tokens call carries decode rows and a prompt piece of another row."""
    return len(set(rows)) > 1 and len(rows) > len(set(rows))


def test_a_long_prompt_rides_in_the_decode_steps_of_a_bin_on_the_kernels(trained_ckpt, tmp_path, monkeypatch):
    """A .bin on FishAI's CPU kernels: while a stream runs, the prefill pieces of a 1,900-token prompt
    run inside the stream's decode steps (one call of the C trunk with both cache rows,
    Engine.step_tokens), the stream gets tokens during the prefill, and both replies are what
    each request gives alone (the trunk computes every token on its own)."""
    import engine
    path, long_prompt = _long_prompt_bin(trained_ckpt, tmp_path)
    mixed, real = [], engine.Engine.step_tokens

    def spy(eng, tokens, positions, rows, out=None):
        if _mixed(rows):
            mixed.append(len(rows))
        return real(eng, tokens, positions, rows, out)
    monkeypatch.setattr(engine.Engine, "step_tokens", spy)
    s = InProcessServer(path)
    try:
        run_body = {"model": "tiny", "prompt": "The function returns", "max_tokens": 400, "temperature": 0}
        long_body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 8, "temperature": 0}
        alone = {k: json.loads(s.post("/v1/completions", b, key=None)[1])["choices"][0]["text"]
                 for k, b in (("run", run_body), ("long", long_body))}
        assert not mixed  # alone, nothing to mix
        log, started, ran = [], threading.Event(), {}
        running = threading.Thread(target=lambda: ran.setdefault("r", s.stream(
            "/v1/completions", run_body, key=None, started=started, after=3, on_event=lambda p: log.append("S"))))
        running.start()
        assert started.wait(30)
        log.append("sent")
        code, text = s.post("/v1/completions", long_body, key=None)
        log.append("answered")
        running.join(timeout=60)
        assert code == 200 and json.loads(text)["choices"][0]["text"] == alone["long"]
        status, payloads = ran["r"]
        assert status == 200 and "".join(p["choices"][0]["text"] for p in payloads if isinstance(p, dict)) == alone["run"]
        assert len(mixed) >= 3, mixed                                        # pieces rode in decode steps
        assert log[log.index("sent"):log.index("answered")].count("S") >= len(mixed) // 2
    finally:
        s.stop()


def test_a_failed_mixed_turn_ends_only_the_requests_in_it(trained_ckpt, tmp_path, monkeypatch):
    """A decode step that carries a prompt piece (a .bin on the kernels) and fails: the stream in it
    ends with an error event then [DONE], the prompt's request with a 500 and the OpenAI error body;
    a request queued behind them was in no step, runs next and gets its lone answer; the gauges
    come back to 0."""
    import engine
    path, long_prompt = _long_prompt_bin(trained_ckpt, tmp_path)
    real, ctl = engine.Engine.step_tokens, {"mixed": 0, "fail": False}

    def step_tokens(eng, tokens, positions, rows, out=None):
        if _mixed(rows):
            ctl["mixed"] += 1
            if ctl["fail"]:
                raise RuntimeError("device lost")
        if len(set(rows)) > 1 or len(rows) == 1:  # decode steps are slow: the stream outlasts the test's
            time.sleep(0.02)                      # steps, the prefill many turns (a request queues meanwhile)
        return real(eng, tokens, positions, rows, out)
    monkeypatch.setattr(engine.Engine, "step_tokens", step_tokens)
    s = InProcessServer(path, "--max-batch", 2)
    try:
        queued = {"model": "tiny", "prompt": "Write", "max_tokens": 10, "temperature": 0}
        alone = json.loads(s.post("/v1/completions", queued, key=None)[1])["choices"]
        threads, results = _long_streams(s, 1)
        got = {}
        long_body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 4, "temperature": 0}
        ask = [threading.Thread(target=lambda: got.setdefault("long", s.post("/v1/completions", long_body, key=None)))]
        ask[0].start()
        deadline = time.time() + 30
        while ctl["mixed"] < 2 and time.time() < deadline:  # its pieces ride in the stream's steps
            time.sleep(0.01)
        ask.append(threading.Thread(target=lambda: got.setdefault("queued", s.post("/v1/completions", queued,
                                                                                   key=None))))
        ask[1].start()
        assert s.wait_for_metric("fishai_queue_depth", 1.0) == 1.0  # (the long prompt holds the second row)
        ctl["fail"] = True
        for t in threads + ask:
            t.join(timeout=60)
        _ended_with_error(results[0], "decoding failed: RuntimeError: device lost")
        code, text = got["long"]
        assert code == 500 and "decoding failed: RuntimeError: device lost" in json.loads(text)["error"]["message"]
        assert got["queued"][0] == 200 and json.loads(got["queued"][1])["choices"] == alone
        assert s.wait_for_metric("fishai_active_requests", 0.0) == 0.0
        assert s.wait_for_metric("fishai_queue_depth", 0.0) == 0.0
    finally:
        s.stop()


def test_the_next_prefill_piece_follows_the_last_pieces_time():
    """The piece size is a controller on time: the last piece scaled to stall_steps decode turns,
    at most halved or doubled a turn, within MIN_PREFILL_CHUNK..--prefill-chunk."""
    import serve
    nxt = serve.next_piece
    assert nxt(None, 0.002, 3, 256) == 16 and nxt((32, 0.01), None, 3, 8) == 8   # nothing measured yet
    assert nxt((32, 0.010), 0.002, 3, 256) == 19       # 32 tokens took 10 ms, 6 ms allowed: 32 * 6 / 10
    assert nxt((32, 0.001), 0.002, 3, 256) == 64       # far under: doubled, not 192 at once
    assert nxt((32, 0.100), 0.002, 3, 256) == 16       # far over: halved
    assert nxt((6, 0.100), 0.002, 3, 256) == serve.MIN_PREFILL_CHUNK
    assert nxt((200, 0.001), 0.002, 3, 256) == 256     # never past --prefill-chunk

"""serve.py: the real server in a child process on a free loopback port, used through the official
`openai` client (and raw HTTP where the client would hide what is checked): chat and completions,
streamed and not, usage, stop, n, seed, logprobs, every error code, continuous batching against lone
runs, disconnects, metrics, --watch; plus lm-evaluation-harness's local-completions against the
server and a real headless browser on the web chat."""
import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
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

    def request(self, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None,
                timeout: float = 60):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def get(self, path: str, key: str | None = KEY):
        return self.request("GET", path, key=key, timeout=5)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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
    """What the model itself says, greedy, through model.stream_generate (generate.py's path)."""
    from model import generate_samples
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
    from data_utils import chat_stop_ids
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
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS, ids=[f"{s}-{p}" for _, s, p in BAD_REQUESTS])
def test_bad_requests_get_the_openai_error_body(server, body, status, param):
    code, text = server.post("/v1/chat/completions", body)
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
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(s.post("/v1/completions", body)[0]))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert 429 in codes and 200 in codes, codes
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
    for args, needle in ((["--model", tmp_path / "none.pt"], "--model"), (["--port", "0"], "--port")):
        r = subprocess.run([sys.executable, str(ROOT / "serve.py"), *map(str, args)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error:") and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: " in r.stderr and "bad.pt" in r.stderr


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
    from model import load_checkpoint, save_checkpoint, GPT, ModelConfig
    from test_evaluate import PEER_MMLU, _our_data_dir, _peer_task_yamls
    # the trained weights with a 1024-token context (RoPE is computed, not learned): no document is cut,
    # so both sides score the same tokens
    ck = load_checkpoint(trained_ckpt)
    cfg = ModelConfig.from_dict({**ck["config"], "max_seq_len": 1024})
    m = GPT(cfg)
    m.load_state_dict(ck["model"])
    from data_utils import TextTokenizer
    m.tokenizer = TextTokenizer.from_dict(ck["tokenizer"])
    long_ckpt = tmp_path / "tiny-1024.pt"
    save_checkpoint(long_ckpt, m)
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

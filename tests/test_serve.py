"""`lmtrain serve` against the official openai client on 127.0.0.1: greedy replies equal `lmtrain chat
--greedy`'s, streams concatenate to the same text, concurrent requests are decoded together, errors
come back as OpenAI error objects, a lost client frees its slot; and the chat page, in headless
chromium, streams the same reply the API gives."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_chat import swap_run  # noqa: E402,F401  (the module fixture: a tiny model that swaps words)

KEY = "test-key"
PROMPTS = ["swap apple river", "swap green tiger", "swap music stone", "swap horse paper",
           "swap cloud dream", "swap light table", "swap ocean plant", "swap smile train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(swap_run):  # noqa: F811
    """The server in this process, on a free port of 127.0.0.1; stopped when the module ends."""
    import uvicorn

    from lmtrain.server import create_app, open_server

    _, run_dir, _ = swap_run
    srv = open_server(run_dir, api_key=KEY, slots=8, queue_size=4, name="swap")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(srv), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield srv, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=30)


def client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def ask(base: str, prompt: str, **kwargs) -> str:
    reply = client(base).chat.completions.create(model="swap", messages=[{"role": "user", "content": prompt}],
                                                 temperature=0, max_tokens=24, **kwargs)
    return reply.choices[0].message.content


@pytest.mark.slow
def test_greedy_replies_equal_lmtrain_chat_and_streams_concatenate_to_them(server, swap_run):  # noqa: F811
    _, base = server
    _, run_dir, _ = swap_run
    result = run_cli("chat", "--run", str(run_dir), "--greedy", "-n", "24",
                     input="\n/reset\n".join(PROMPTS) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    from_chat = result.stdout.splitlines()
    api = client(base)
    for prompt, want in zip(PROMPTS, from_chat):
        reply = api.chat.completions.create(model="swap", messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=24)
        assert reply.choices[0].message.content == want
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + \
            reply.usage.completion_tokens
        chunks = api.chat.completions.create(model="swap", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=24, stream=True,
                                             stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(pieces) == want and usage.completion_tokens == reply.usage.completion_tokens
    models = api.models.list()
    assert [m.id for m in models.data] == ["swap"]
    completion = api.completions.create(model="swap", prompt="swap", max_tokens=5, temperature=0, seed=1)
    assert completion.usage.completion_tokens <= 5


@pytest.mark.slow
def test_eight_concurrent_clients_are_decoded_together_in_fewer_steps_than_in_a_row(server):
    srv, base = server
    long = dict(max_tokens=48, temperature=1.0, seed=3)  # sampled replies run long: the batch stays full

    def one(prompt):
        return client(base).chat.completions.create(model="swap", messages=[{"role": "user", "content": prompt}],
                                                    **long).usage.completion_tokens

    # Counted in batched decoding steps, not seconds (a busy CI machine makes wall time noise; the
    # speed itself is scripts/bench_chat.py's): eight together take far fewer steps than in a row.
    steps = srv.engine.steps
    in_a_row = [one(p) for p in PROMPTS]
    sequential, steps = srv.engine.steps - steps, srv.engine.steps
    srv.engine.max_batch = 0
    engine, admit = srv.engine, srv.engine._admit

    def admit_once_all_have_arrived():
        # Eight client threads on a busy 2-core machine reach the server at different moments, and
        # a tiny model can finish a reply before the last arrives: the first admission waits for
        # all eight (or 30 s), so the batch is what is tested, not the arrival times.
        deadline = time.monotonic() + 30
        while not engine.running and len(engine.waiting) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        admit()

    engine._admit = admit_once_all_have_arrived
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(one, PROMPTS))
    finally:
        del engine._admit
    concurrent = srv.engine.steps - steps
    assert together == in_a_row  # same seeds, same replies, batched or not
    assert srv.engine.max_batch == len(PROMPTS)
    assert concurrent < sequential / 2, (concurrent, sequential)


def post(base: str, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_each_mistake_gets_its_status_and_an_openai_error_object(server):
    srv, base = server
    ok = {"model": "swap", "messages": [{"role": "user", "content": "swap apple river"}], "max_tokens": 4}
    cases = [
        (json.dumps(ok).encode(), "wrong", 401, "invalid_api_key"),
        (json.dumps(ok).encode(), None, 401, "invalid_api_key"),
        (json.dumps({**ok, "model": "gpt-4"}).encode(), KEY, 404, "model_not_found"),
        (json.dumps({**ok, "messages": [{"role": "user", "content": "swap " * 200}]}).encode(), KEY, 413,
         "context_length_exceeded"),
        (b'{"model": "swap", "messages": [', KEY, 400, None),
        (json.dumps({**ok, "temperature": 7}).encode(), KEY, 400, None),
        (json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}).encode(), KEY, 400, None),
    ]
    for body, key, status, code in cases:
        got, answer = post(base, "/v1/chat/completions", body, key)
        assert got == status, (body[:60], answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert answer["error"]["code"] == code
    with pytest.raises(openai.AuthenticationError):
        ask_wrong = client(base, "nope")
        ask_wrong.models.list()
    assert post(base, "/v1/nothing", b"{}")[0] == 404


@pytest.mark.slow
def test_a_full_queue_is_503_and_a_lost_client_frees_its_place(server):
    srv, base = server
    engine = srv.engine
    # A client that reads two chunks and hangs up: its slot is back before the next request needs it.
    body = json.dumps({"model": "swap", "messages": [{"role": "user", "content": "swap apple river"}],
                       "stream": True, "max_tokens": 60, "temperature": 1.0}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()
    response.close()
    deadline = time.time() + 20
    while engine.load != (0, 0) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load == (0, 0)
    assert ask(base, "swap green tiger") == "tiger green"  # still serving
    # Full: as many waiting as there are free slots and the queue (4) holds -> 503 with OpenAI's error object.
    admit = engine._admit
    engine._admit = lambda: time.sleep(0.01)  # nothing leaves the queue while it is filled
    try:
        for _ in range(engine.queue_size + engine.slots):
            engine.submit(_parked_job())
        status, answer = post(base, "/v1/chat/completions", json.dumps(
            {"model": "swap", "messages": [{"role": "user", "content": "swap a b"}]}).encode())
    finally:
        engine._admit = admit
    assert status == 503 and answer["error"]["code"] == "queue_full"
    deadline = time.time() + 20
    while engine.load != (0, 0) and time.time() < deadline:  # the parked jobs were cancelled: they just leave
        time.sleep(0.05)
    assert engine.load == (0, 0)
    assert ask(base, "swap green tiger") == "tiger green"


def _parked_job():
    from lmtrain.batching import Job
    from lmtrain.generate import SamplingParams

    return Job([0], SamplingParams(0.0), 1, lambda kind, value: None, cancelled=True)


@pytest.mark.slow
def test_the_chat_page_streams_the_reply_the_api_gives(server):
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, base = server
    want = ask(base, "swap music stone")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(base + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        driver.find_element(By.ID, "input").send_keys("swap music stone")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 60)
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant"))
        seen = set()
        wait.until(lambda d: seen.add(reply.text) or reply.get_attribute("data-state") != "streaming")
        assert reply.get_attribute("data-state") == "done"
        assert reply.text == want
        assert driver.find_element(By.CSS_SELECTOR, ".message.user").text == "swap music stone"
        assert driver.find_element(By.ID, "model").text == "swap"
    finally:
        driver.quit()

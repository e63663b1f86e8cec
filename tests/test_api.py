"""The HTTP endpoint end to end: a real swarm (bootstrap + 2 peer processes), `ApiServer` serving it,
the official `openai` client and plain HTTP against it, and headless Chromium on the two pages.

Outputs are checked against transformers' own `generate` on the same weights and tokenizer. The
tiny random llama has no tokenizer, so the module gives a copy of it one (a BPE trained on a fixed
paragraph, with a chat template); the copy has its own folder name and so its own DHT key space.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from molink.swarm import DistributedModelForCausalLM
from molink.swarm.api import ApiServer, Limits
from molink.swarm.api.engine import TextAssembler
from molink.swarm.local_swarm import LocalSwarm

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "api"
MODEL_ID = "tiny-chat"
SPANS = [(0, 3), (3, 6)]
LIMITS = Limits(max_tokens=300, max_prompt_tokens=256, max_concurrent=2, request_timeout=30.0,
                max_body_bytes=256 * 1024)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
# The tokenizer's training text: fixed here (not read from a file that changes), so the token ids,
# and with them the tiny model's answers, are the same on every run.
CORPUS = """
Volunteers host a span of a model's blocks on their own machines, and researchers call the swarm
from Python as if the whole model were local. A peer loads only the blocks it serves, measures its
speed, and announces a signed record in the distributed hash table. Clients read those records,
plan a route through peers that cover every block, and open one session per hop. Each token travels
from the client to the first peer, from peer to peer, and back to the client, which applies the final
norm and the language model head and samples the next token. When a peer leaves, dies or freezes,
the client bans it for a while, plans a new route and replays what it fed the swarm, so greedy and
seeded sampling give the same tokens as an undisturbed run. The capital of France is Paris; the
capital of Italy is Rome; the capital of Spain is Madrid. What is the capital of Germany? It is
Berlin. Peers batch the decode steps of many sessions together and run prompts in chunks behind
them. The wire format is a length, then a map with a type, a request id and a body. Tensors carry
their dtype, shape, codec and data, and every size is checked before anything is allocated.
"""
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------- fixtures


def add_tokenizer(model_dir: Path) -> None:
    """A BPE of at most 512 tokens (the tiny model's vocabulary) with pad/bos/eos at the config's ids 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / MODEL_ID
    shutil.copytree(tiny_llama, out)
    add_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(model_dir):
    with LocalSwarm(model_dir, SPANS, extra_args=["--metrics-port", "0"]) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="module")
def api(model_dir, swarm, tokenizer):
    model = DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers)
    server = ApiServer(model, tokenizer, MODEL_ID, port=0, limits=LIMITS)
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    try:
        assert server.ready.wait(30), "the API server did not start"
        yield server
    finally:
        server.stop()
        thread.join(15)
        model.close()
    assert not thread.is_alive(), "the API server did not stop"


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def expected(reference, tokenizer, ids: list[int], max_new: int, seed: int | None = None, **sampling):
    """transformers' generate: (text, new token count, finish reason) as the API should report them."""
    input_ids = torch.tensor([ids])
    if seed is not None:
        torch.manual_seed(seed)
    options = dict(do_sample=True, top_k=0, **sampling) if sampling else dict(do_sample=False)
    with torch.no_grad():
        out = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                                 **options)
    new = out[0, len(ids):].tolist()
    finish = "stop" if new and new[-1] == tokenizer.eos_token_id else "length"
    return tokenizer.decode(new, skip_special_tokens=True), len(new), finish


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def post(api, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{api.url}{path}", timeout=60, **kwargs)


# ---------------------------------------------------------------------------- unit: text assembly


def test_text_assembler_holds_back_and_cuts_stop_strings(tokenizer):
    ids = tokenizer("the swarm serves the model to everyone")["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    plain = TextAssembler(tokenizer, [])
    assert "".join(plain.add([i]) for i in ids) + plain.add([], final=True) == full
    stop = TextAssembler(tokenizer, ["model"])
    pieces = "".join(stop.add([i]) for i in ids)
    assert stop.stopped and pieces == full[:full.index("model")]


# ---------------------------------------------------------------------------- the openai client


def test_openai_chat_equals_transformers(client, reference, tokenizer):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    text, tokens, finish = expected(reference, tokenizer, chat_ids(tokenizer, QUESTION), 24)
    answer = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == finish
    assert answer.usage.completion_tokens == tokens
    route = answer.model_extra["molink"]["route"]
    assert [(hop["start"], hop["end"]) for hop in route] == SPANS  # the peers that served it

    stream = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(pieces) > 1  # streamed, not one block at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == tokens


def test_openai_completion_sampling_and_stop(client, reference, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    text, tokens, finish = expected(reference, tokenizer, ids, 20)
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0)
    assert (answer.choices[0].text, answer.usage.completion_tokens, answer.choices[0].finish_reason) == \
        (text, tokens, finish)

    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == text

    # seeded sampling: the tokens of torch.manual_seed(seed) + generate, concurrency or not
    sampled, _, _ = expected(reference, tokenizer, ids, 20, seed=1234, temperature=0.8, top_p=0.9)
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0.8, top_p=0.9,
                                       seed=1234)
    assert answer.choices[0].text == sampled

    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_openai_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as info:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=100_000)
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, n=2)


# ---------------------------------------------------------------------------- HTTP status codes


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_clear_errors(api):
    bad = post(api, "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and error_of(bad)["code"] == "invalid_json"
    too_long = post(api, "/v1/completions", json={"prompt": "swarm " * 2000, "max_tokens": 4})
    assert too_long.status_code in (400, 413) and "256" in error_of(too_long)["message"]
    too_big = post(api, "/v1/completions", json={"prompt": "x" * (LIMITS.max_body_bytes + 10)})
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "request_too_large"
    assert error_of(httpx.get(f"{api.url}/v1/nothing-here"))["type"] == "not_found_error"
    assert httpx.get(f"{api.url}/v1/chat/completions").status_code == 405
    bad_value = post(api, "/v1/completions", json={"prompt": PROMPT, "temperature": "hot"})
    assert bad_value.status_code == 400 and error_of(bad_value)["param"] == "temperature"
    # and the server still answers normally
    assert post(api, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}).status_code == 200


def read_until_data(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line[6:]
    raise AssertionError("stream ended without data")


def stream_text(lines, first: str) -> tuple[str, dict]:
    text, last = "", None
    for data in [first, *(line[6:] for line in lines if line.startswith("data: "))]:
        if data == "[DONE]":
            return text, last
        last = json.loads(data)
        text += "".join(c["text"] for c in last["choices"])
    raise AssertionError("no [DONE]")


def test_too_many_concurrent_requests_get_429(api):
    body = {"prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{api.url}/v1/completions", json=body) as first, \
            http.stream("POST", f"{api.url}/v1/completions", json=body) as second:
        lines = [first.iter_lines(), second.iter_lines()]
        heads = [read_until_data(it) for it in lines]  # both admitted and generating now
        busy = http.post(f"{api.url}/v1/completions", json={**body, "stream": False})
        assert busy.status_code == 429 and error_of(busy)["type"] == "rate_limit_error"
        assert busy.headers["retry-after"]
        assert http.get(f"{api.url}/v1/models").status_code == 200  # the rest of the API still answers
        results = [stream_text(it, head) for it, head in zip(lines, heads)]
    # both ran to their end: 250 tokens (PROMPT's greedy answer has no eos), long enough to overlap the 429
    assert results[0][0] == results[1][0] and results[0][1]["choices"][0]["finish_reason"] == "length"
    normal = post(api, "/v1/completions", json={**body, "stream": False})  # slots free again
    assert normal.status_code == 200 and normal.json()["choices"][0]["text"] == results[0][0]


def test_disconnect_and_timeout_free_the_slot(api):
    body = {"prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{api.url}/v1/completions", json=body, timeout=60) as response:
        read_until_data(response.iter_lines())
    deadline = time.monotonic() + 10  # the client hung up: its generation is cancelled
    while httpx.get(f"{api.url}/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{api.url}/health").json()["active_requests"] == 0

    saved = api.engine.limits.request_timeout
    api.engine.limits.request_timeout = 0.05
    try:
        slow = post(api, "/v1/completions", json={**body, "stream": False})
    finally:
        api.engine.limits.request_timeout = saved
    assert slow.status_code == 504 and error_of(slow)["code"] == "request_timeout"


# ---------------------------------------------------------------------------- swarm map and metrics


def test_swarm_json_and_peer_metrics(api, swarm):
    post(api, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    snapshot = httpx.get(f"{api.url}/api/swarm", timeout=30).json()
    model = snapshot["models"][0]
    assert model["covered"] and model["num_blocks"] == 6 and all(b["peers"] for b in model["blocks"])
    assert sorted((p["start"], p["end"]) for p in model["peers"]) == SPANS
    assert {p["reachability"] for p in model["peers"]} == {"direct"}
    assert {p["state"] for p in model["peers"]} == {"serving"}
    assert all(p["steps"] > 0 for p in model["peers"])  # asked live (INFO), not from the record

    for peer in swarm.peers:
        url = re.search(r"metrics at (\S+)", peer.log_file.read_text()).group(1)
        metrics = httpx.get(url, timeout=10).text
        values = dict(re.findall(r"^(molink_peer_\w+) (\S+)$", metrics, re.M))
        assert float(values["molink_peer_steps_total"]) > 0 and float(values["molink_peer_tokens_total"]) > 0
        assert {"molink_peer_sessions_open", "molink_peer_cache_tokens_free", "molink_peer_cache_tokens_used",
                "molink_peer_errors_total"} <= set(values)
        assert float(values["molink_peer_blocks_start"]) == peer.blocks[0]


# ---------------------------------------------------------------------------- the pages, in Chromium


def chromium_driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(scripts/setup_env.sh installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # both paths given: selenium never looks for (or downloads) a browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def test_chat_page_and_swarm_map_in_chromium(api, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    greedy = client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=128,
                                            temperature=0).choices[0].message.content
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = chromium_driver()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{api.url}/")
        wait.until(lambda d: MODEL_ID in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "prompt").send_keys(QUESTION[0]["content"])
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.ID, "status").text == "done"
        answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == greedy
        assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces
        meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
        assert "served by" in meta and "tokens/s" in meta and meta.count("→") == len(SPANS) - 1
        chat_png = ARTIFACTS / "chat.png"
        driver.save_screenshot(str(chat_png))

        driver.get(f"{api.url}/swarm")
        wait.until(lambda d: "all 6 blocks covered" in d.find_element(By.ID, "models").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "tbody tr")) == len(SPANS)
        assert not driver.find_elements(By.CSS_SELECTOR, ".block.r0")  # no uncovered block drawn
        swarm_png = ARTIFACTS / "swarm.png"
        driver.save_screenshot(str(swarm_png))
    finally:
        driver.quit()
    print(f"screenshots: {chat_png} {swarm_png}")

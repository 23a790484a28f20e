"""Multi-LoRA serving end to end (issue 19): one app, two model replicas of the demo model, four
configured peft adapters (real non-zero weights, made here) and a dynamic_path, at most two adapters
per replica. Every adapter's greedy output through the endpoint equals peft's merged model `generate`,
token for token, in batches that mix adapters and the base model; the id forms work on every route
tried; repeated requests for an adapter go to the replica holding it; runtime load/unload leaves running
streams whole; hostile adapters are clear 4xx and the replicas keep serving."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from ray import serve
from safetensors.torch import load_file, save_file

from tests.e2e.tgi_stream import read_tgi_events
from tests.e2e.variants import call_deployment, deploy, model_args
from tests.unit.lora_adapters import ADAPTERS, fresh_model, make_adapter, make_adapters, merged

pytestmark = pytest.mark.e2e
APP = "lora"
MODEL = "lora-demo"
DEPLOYMENT = f"Model-{MODEL}"
OPTIONS = {DEPLOYMENT: {"num_replicas": 2, "max_ongoing_requests": 32}}
NAMES = list(ADAPTERS)  # the four configured adapters
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
PROMPTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i)) for i in range(6)]


@pytest.fixture(scope="module")
def adapters(model_path, tmp_path_factory) -> dict:
    """Adapter directories: the configured four, and under `dynamic`: one found on first use, one for
    runtime loads, and the hostile ones (corrupt config, rank over max_rank, a target the model lacks);
    `outside` lies outside every allowed directory."""
    root = tmp_path_factory.mktemp("lora")
    base = fresh_model(model_path)
    dirs = {name: str(path) for name, path in make_adapters(base, root / "configured").items()}
    dynamic = root / "dynamic"
    qv = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for seed, name in enumerate(["dyn", "runtime", "corrupt", "missing_target"], start=20):
        dirs[name] = str(make_adapter(base, dynamic / name, seed, **qv))
    dirs["big"] = str(make_adapter(base, dynamic / "big", 30, r=32, lora_alpha=8, target_modules=["q_proj"]))
    dirs["outside"] = str(make_adapter(base, root / "outside", 31, **qv))
    (dynamic / "corrupt" / "adapter_config.json").write_text("{not json")
    # weights and config of a module the model does not have (q_proj renamed)
    weights = dynamic / "missing_target" / "adapter_model.safetensors"
    save_file({k.replace("q_proj", "no_such_proj"): v for k, v in load_file(weights).items()}, weights)
    config = dynamic / "missing_target" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["no_such_proj", "v_proj"]}))
    return {"dirs": dirs, "dynamic": str(dynamic), "base": base}


@pytest.fixture(scope="module")
def app(server, model_path, adapters):
    model = model_args(model_path, MODEL, max_num_seqs=8)
    model["lora"] = {"adapters": {n: adapters["dirs"][n] for n in NAMES}, "dynamic_path": adapters["dynamic"],
                     "max_adapters_per_replica": 2, "max_rank": 16}
    url = deploy(server, APP, {"models": [model]}, OPTIONS)
    yield url
    serve.delete(APP, _blocking=False)


@pytest.fixture(scope="module")
def reference(adapters, hf_model):
    """Greedy ids (to EOS, as the endpoint stops) of peft's merged model for adapter `name`, or of the
    base model's own `generate` for None."""
    cache: dict = {}

    models: dict = {}
    model, tokenizer = hf_model

    @torch.inference_mode()
    def expected(name: str | None, prompt: str, max_tokens: int) -> list[int]:
        key = (name, prompt, max_tokens)
        if key not in cache:
            if name not in models:
                models[name] = model if name is None else merged(adapters["base"], adapters["dirs"][name])
            ids = tokenizer.encode(prompt)
            out = models[name].generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
            cache[key] = out[0, len(ids):].tolist()
        return cache[key]

    return expected


async def stream_ids(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed generation through TGI's route (its events carry each token's id): the ids in order,
    error events, finish_reason; `status` and `body` when it was refused."""
    body = {"inputs": prompt, "model": model, "parameters": {"max_new_tokens": max_tokens, "details": True},
            "stream": True}
    result = {"ids": [], "errors": [], "finish": None, "status": 200}
    async with http.stream("POST", f"{url}/", json=body) as r:
        if r.status_code != 200:
            return {**result, "status": r.status_code, "body": json.loads(await r.aread())}
        return await read_tgi_events(r, result)


def run(coro):
    return asyncio.run(coro)


async def gather_streams(url: str, jobs: list[tuple[str, str, int]]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*(stream_ids(http, url, m, p, n) for m, p, n in jobs))


def per_replica(method: str, calls: int = 24) -> dict[str, dict]:
    """`method`'s answer from each model replica (the router spreads calls without a request over both)."""
    seen = {}
    for _ in range(calls):
        answer = call_deployment(APP, DEPLOYMENT, method)
        seen[answer["replica"]] = answer
    return seen


def test_four_adapters_and_the_base_in_one_batch_each_equal_peft(app, reference):
    """Each adapter's output equals peft's merged model while the base and the other adapters decode
    in the same batches (max 2 adapters per replica: the others wait for a slot, none fails)."""
    jobs = [(f"{MODEL}:{name}" if i % 2 else name, PROMPTS[i], 16) for i, name in enumerate(NAMES)]
    jobs += [(MODEL, PROMPTS[4], 16), (MODEL, PROMPTS[5], 16)]
    results = run(gather_streams(app, jobs))
    for (model, prompt, n), result, name in zip(jobs, results, [*NAMES, None, None]):
        assert result["status"] == 200 and not result["errors"], result
        assert result["ids"] == reference(name, prompt, n), model
        if name is not None:  # the adapter changes the output: the equality above is no base-model echo
            assert reference(name, prompt, n) != reference(None, prompt, n), name


def test_both_id_forms_on_chat_completions_and_anthropic(app):
    name = NAMES[3]
    texts = {}
    for model in (name, f"{MODEL}:{name}", MODEL):
        completion = httpx.post(f"{app}/v1/completions", timeout=60, json={
            "model": model, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert completion.status_code == 200, completion.text
        assert completion.json()["model"] == model
        chat = httpx.post(f"{app}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
            "temperature": 0})
        assert chat.status_code == 200, chat.text
        anthropic = httpx.post(f"{app}/v1/messages", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
            "temperature": 0})
        assert anthropic.status_code == 200, anthropic.text
        content = anthropic.json()["content"]
        texts[model] = (completion.json()["choices"][0]["text"], chat.json()["choices"][0]["message"]["content"],
                        content[0]["text"] if content else "")
        assert texts[model][1] == texts[model][2], model  # one chat template, one greedy answer
    assert texts[name] == texts[f"{MODEL}:{name}"]
    assert texts[name][0] != texts[MODEL][0] and texts[name][1] != texts[MODEL][1]


def test_an_adapter_is_an_azure_deployment(app):
    """Azure's deployment routes take either id of an adapter, answer as OpenAI's route does for it, and
    keep DeploymentNotFound for names that can be neither a model nor an adapter."""
    name = NAMES[2]
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0}
    openai = httpx.post(f"{app}/v1/chat/completions", timeout=60, json={"model": name, **chat})
    assert openai.status_code == 200, openai.text
    for deployment in (name, f"{MODEL}:{name}"):
        azure = httpx.post(f"{app}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
                           timeout=60, json=chat)
        assert azure.status_code == 200, azure.text
        assert azure.json()["choices"][0]["message"] == openai.json()["choices"][0]["message"]
    # a well-formed name may be a directory under dynamic_path: the replica looks, and finds none
    missing = httpx.post(f"{app}/openai/deployments/no-such-adapter/chat/completions?api-version=2024-10-21",
                         timeout=30, json=chat)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text
    neither = httpx.post(f"{app}/openai/deployments/-neither/chat/completions?api-version=2024-10-21",
                         timeout=30, json=chat)
    assert neither.status_code == 404 and neither.json()["error"]["code"] == "DeploymentNotFound", neither.text


def test_models_lists_adapters_with_their_parent(app):
    cards = {c["id"]: c for c in httpx.get(f"{app}/v1/models").json()["data"]}
    assert cards[MODEL]["parent"] is None
    for name in NAMES:
        assert cards[name]["parent"] == MODEL and cards[name]["root"] == MODEL
    one = httpx.get(f"{app}/v1/models/{MODEL}:{NAMES[0]}")
    assert one.status_code == 200 and one.json()["parent"] == MODEL


def test_unknown_adapters_are_404_in_each_apis_shape(app):
    for model in ("no-such-adapter", f"{MODEL}:no-such-adapter", f"{MODEL}:..", "dyn/../x"):
        r = httpx.post(f"{app}/v1/chat/completions", timeout=30,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
    r = httpx.post(f"{app}/v1/messages", timeout=30,
                   json={"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 404 and r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"


def test_a_dynamic_path_adapter_is_found_on_first_use(app, reference):
    for model in ("dyn", f"{MODEL}:dyn"):
        (result,) = run(gather_streams(app, [(model, PROMPTS[1], 10)]))
        assert result["status"] == 200 and result["ids"] == reference("dyn", PROMPTS[1], 10), result


def test_repeated_requests_for_an_adapter_go_to_the_replica_holding_it(app):
    name = NAMES[2]
    run(gather_streams(app, [(name, PROMPTS[0], 2)]))
    time.sleep(2)  # the replica tells Serve's controller what it holds; the routers hear it
    before = {r: s["requests"].get(name, 0) for r, s in per_replica("lora_stats").items()}
    for prompt in PROMPTS:  # different prompts: the prefix alone would spread them
        run(gather_streams(app, [(name, prompt, 2)]))
    after = per_replica("lora_stats")
    served = {r: s["requests"].get(name, 0) - before.get(r, 0) for r, s in after.items()}
    holder = max(served, key=served.get)
    assert served[holder] == len(PROMPTS) and sum(served.values()) == len(PROMPTS), served
    assert name in after[holder]["loaded"], after[holder]


def test_two_slots_per_replica_evict_and_reload_correctly(app, reference):
    """Five adapters over 2 replicas x 2 slots, twice round: something is evicted, and every output
    (first use, or reloaded after eviction) still equals peft's."""
    names = [*NAMES, "dyn"]
    for _ in range(2):
        for i, name in enumerate(names):
            (result,) = run(gather_streams(app, [(name, PROMPTS[i % len(PROMPTS)], 8)]))
            assert result["ids"] == reference(name, PROMPTS[i % len(PROMPTS)], 8), name
    stats = per_replica("lora_stats").values()
    assert sum(s["evictions"] for s in stats) >= 1, list(stats)
    assert all(len(s["loaded"]) <= 2 and s["max_lora"] == 2 for s in stats), list(stats)


def test_load_and_unload_at_runtime_leave_other_streams_whole(app, adapters, reference):
    long = [(NAMES[0], PROMPTS[2], 120), (NAMES[1], PROMPTS[3], 120), (MODEL, PROMPTS[4], 120)]

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as http:
            streams = [asyncio.create_task(stream_ids(http, app, *job)) for job in long]
            await asyncio.sleep(0.5)
            steps = []
            # registered under a name of its own: once unloaded, `rt` is no directory under dynamic_path either
            load = {"lora_name": "rt", "lora_path": adapters["dirs"]["runtime"]}
            steps.append((await http.post(f"{app}/v1/load_lora_adapter", json=load)).status_code)
            steps.append(await stream_ids(http, app, "rt", PROMPTS[5], 10))
            steps.append((await http.post(f"{app}/v1/unload_lora_adapter", json={"lora_name": "rt"})).status_code)
            steps.append((await stream_ids(http, app, "rt", PROMPTS[5], 4))["status"])
            steps.append((await http.post(f"{app}/v1/load_lora_adapter", json=load)).status_code)
            steps.append(await stream_ids(http, app, f"{MODEL}:rt", PROMPTS[5], 10))
            steps.append((await http.post(f"{app}/v1/unload_lora_adapter", json={"lora_name": "rt"})).status_code)
            running = [not s.done() for s in streams]
            return steps, running, await asyncio.gather(*streams)

    steps, running, results = run(scenario())
    expected = reference("runtime", PROMPTS[5], 10)
    assert steps[0] == 200 and steps[1]["ids"] == expected, steps
    assert steps[2] == 200 and steps[3] == 404, steps
    assert steps[4] == 200 and steps[5]["ids"] == expected and steps[6] == 200, steps
    assert any(running), "the long streams ended before the loads: the test proved nothing"
    for (model, prompt, n), result in zip(long, results):
        name = None if model == MODEL else model
        assert not result["errors"] and result["ids"] == reference(name, prompt, n), model


def test_hostile_adapters_are_clear_4xx_and_the_replicas_keep_serving(app, adapters, reference):
    dirs, dynamic = adapters["dirs"], adapters["dynamic"]
    cases = [  # (lora_name, lora_path, status, param, words the message must hold)
        ("o1", dirs["outside"], 400, "lora_path", "dynamic_path"),
        ("o2", f"{dynamic}/../outside", 400, "lora_path", ".."),
        ("o3", "/etc", 400, "lora_path", "dynamic_path"),
        ("c1", dirs["corrupt"], 400, None, "c1"),
        ("b1", dirs["big"], 400, None, "rank"),
        ("m1", dirs["missing_target"], 400, None, "no_such_proj"),
        ("gone", f"{dynamic}/no-such-dir", 404, "lora_path", "no-such-dir"),
        ("x/y", dirs["dyn"], 400, "lora_name", "lora_name"),
        (NAMES[0], dirs["dyn"], 400, "lora_name", "already"),
    ]
    for name, path, status, param, words in cases:
        r = httpx.post(f"{app}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert words in error["message"] and (param is None or error["param"] == param), (name, error)
    # the same hostile files met on first use through a request: 400 naming the adapter
    for name in ("corrupt", "big", "missing_target"):
        r = httpx.post(f"{app}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and name in r.json()["error"]["message"], (name, r.text)
    assert httpx.post(f"{app}/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}).status_code == 404
    assert httpx.post(f"{app}/v1/load_lora_adapter", json={"lora_name": "a"}).status_code == 400  # no lora_path
    jobs = [(NAMES[0], PROMPTS[0], 6), (MODEL, PROMPTS[1], 6)]
    for (model, prompt, n), result in zip(jobs, run(gather_streams(app, jobs))):
        assert result["ids"] == reference(None if model == MODEL else model, prompt, n)


def test_lora_metrics(app, server):
    deadline = time.monotonic() + 60  # Ray exports replica metrics every few seconds; slower on a loaded machine
    while True:
        try:
            text = httpx.get(f"{server}/metrics", timeout=30).text
        except httpx.TimeoutException:  # a scrape of the whole cluster, slow under load (CI: > 10 s once)
            assert time.monotonic() < deadline, "GET /metrics kept timing out"
            continue
        info = [line for line in text.splitlines()
                if line.startswith("vllm:lora_requests_info{") and f'model_name="{MODEL}"' in line]
        loads = [line for line in text.splitlines()
                 if line.startswith("conduit:lora_adapter_loads_total{") and f'model_name="{MODEL}"' in line]
        if (info and loads) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert info and all('max_lora="2"' in line for line in info), info
    assert sum(float(line.rsplit(" ", 1)[1]) for line in loads) >= 4, loads

"""The stale-adapter guard (rl_lora/sync.py Run.check_push) against a fleet of fake engines: fast, no vLLM.

Each fake engine serves the tensors it was last given, and reports the logprobs of the tiny model under them
(plus Gaussian noise of bf16's size, where asked): exactly what a vLLM engine reports, without the engine. A
"missed" push leaves an engine serving the previous version under the new version's id -- the fault the guard
exists for. The real-engine version of the same fault is in test_faults.py (stale_push).
"""

import pytest
import torch
from sample_builders import build_learner

from rl_lora.config import adapter_specs, load_config
from rl_lora.learner.learner import Learner
from rl_lora.learner.lora import PEFT_PREFIX
from rl_lora.policy import Adapters
from rl_lora.rollout import Completion
from rl_lora.sampling.fleet import _Fleet
from rl_lora.sampling.sampler import AdapterRef
from rl_lora.sync import Run, RunError


class FakeFleet(_Fleet):
    """N engines; prompt i of a request goes to engine i % N, as RayFleet deals them."""

    def __init__(self, engine_learner: Learner, num_engines: int, noise: float = 0.0):
        super().__init__()
        self.num_engines, self.noise, self.model = num_engines, noise, engine_learner
        self.served = [{} for _ in range(num_engines)]  # per engine: version -> the tensors it serves under it
        self.current = [{} for _ in range(num_engines)]  # per engine: slot -> tensors it holds now
        self.miss: set[tuple[int, int]] = set()  # (engine, slot) whose next pushes do not take
        self.wrong: dict[int, int] = {}  # slot -> an earlier slot whose tensors its next pushes serve (a mix-up)
        self.requests: list[list[int]] = []  # per generate call, the engines that served each prompt
        self.sampling: list[dict] = []
        self.calls_n: list[int] = []  # per generate call, its completions per prompt

    def drain(self) -> None:
        pass

    def push_adapter(self, version, slot, tensors, config):
        self._record_push(version, slot, tensors, config)
        tensors = {n: t.clone() for n, t in tensors.items()}
        for e in range(self.num_engines):
            if slot in self.wrong:
                self.current[e][slot] = self.current[e][self.wrong[slot]]
            elif (e, slot) not in self.miss or slot not in self.current[e]:
                self.current[e][slot] = tensors
            self.served[e][version] = self.current[e][slot]
        return AdapterRef(version, "")

    def evict(self, version) -> None:
        self.adapters.pop(version, None)
        for served in self.served:
            served.pop(version, None)

    def _submit(self, req) -> None:
        pass

    def result(self, req):
        self.requests.append([i % self.num_engines for i in range(len(req.prompt_ids_P))])
        self.sampling.append(dict(req.sampling))
        self.calls_n.append(req.n)
        out = []
        for i, (ids, version, seed) in enumerate(zip(req.prompt_ids_P, req.versions_P, req.seeds_P)):
            e = i % self.num_engines
            gen = torch.Generator().manual_seed(seed)
            tokens = [torch.randint(3, 250, (req.sampling["max_tokens"],), generator=gen).tolist()
                      for _ in range(req.n)]
            _load(self.model, self.served[e][version], self.model.slot_of_version(version))
            lps = self.model.score([_sample(ids, t, self.model.slot_of_version(version)) for t in tokens])
            noise = torch.Generator().manual_seed(1000 * seed + e + len(self.requests))
            out.append([Completion(t, [x + self.noise * torch.randn(1, generator=noise).item() for x in lp], "",
                                   "length", version) for t, lp in zip(tokens, lps)])
        return out


def _sample(prompt, tokens, adapter):
    from rl_lora.learner.learner import TrainSample

    return TrainSample(prompt, tokens, [0.0] * len(tokens), 0.0, adapter)


def _load(learner: Learner, tensors: dict, k: int) -> None:
    with torch.no_grad():
        for name, view in learner.adapter_sets[k].items():
            view.lora_A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            view.lora_B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])


def _update(learner: Learner, scale: float, seed: int) -> None:
    """A learner update of a chosen size: every B moves by scale * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for views in learner.adapter_sets:
            for view in views.values():
                view.lora_B.add_(scale * torch.randn(view.lora_B.shape, generator=gen))


def _run(tmp_path, make_config, tiny_model, *, engines: int, noise: float, tol: float, adapters: int = 1,
         probe_ids: tuple = (1, 40, 41, 42, 43, 2, 1, 60)):
    overrides = [f"train.push_check_tol={tol}", "sampler.temperature=0.7", f"sampler.max_loras={adapters + 1}"]
    sections = {"adapters": [{"name": f"a{k}", "lr": 1e-3} for k in range(adapters)]} if adapters > 1 else {}
    cfg = load_config(make_config(**sections), overrides)
    specs = adapter_specs(cfg)

    def learner():
        return build_learner(tiny_model, *specs, temperature=0.7)

    engine_model = learner()
    K = len(specs)
    engine_model.slot_of_version = lambda v: (v - 1) % K
    trained = learner()
    return Run(cfg, FakeFleet(engine_model, engines, noise), trained, Adapters(trained),
               probe_ids=list(probe_ids))


def test_every_engine_is_probed_and_one_missing_the_push_is_caught_below_the_bf16_tolerance(
        tmp_path, make_config, tiny_model):
    """bf16-sized noise (0.02 nats per token) and bf16's tolerance (0.1): an update that moves the probe's
    logprobs by less than the tolerance, missed by the last engine only, stops the run naming that engine."""
    run = _run(tmp_path, make_config, tiny_model, engines=3, noise=0.02, tol=0.1)
    pushed = run.push(0)
    assert run.fleet.requests[-1] == [0, 1, 2]  # one probe request per engine
    assert run.fleet.sampling[-1]["temperature"] == 0.7 and {"top_p", "top_k"} <= set(run.fleet.sampling[-1])
    assert "push/probe_gap_prev" not in pushed.probe  # version 1: nothing to compare with
    for step in (1, 2):
        _update(run.learner, 6e-4, seed=step)  # moves the probe's logprobs by ~0.065 nats per token
        pushed = run.push(step)  # every engine took it: passes
        assert pushed.probe["push/probe_gap"] < 0.03 < pushed.probe["push/probe_gap_prev"] < 0.1
    _update(run.learner, 6e-4, seed=3)
    run.fleet.miss.add((2, 0))
    with pytest.raises(RunError) as err:
        run.push(3)
    msg = str(err.value)
    assert "after step 3" in msg and "on engine 2" in msg and "version 3" in msg and "stale" in msg
    # the stale engine is within the tolerance of the new version: the tolerance alone would not have caught it
    gap_new = float(msg.split(" per token from")[0].split()[-1])
    assert 0.02 < gap_new < 0.1
    # the learner is left exactly as it was (the previous version was scored by swapping tensors in and out)
    assert all(torch.equal(v, run.policy.pushed[1][0][n]) for n, v in _state(run.learner, 0).items())


def test_no_false_alarm_when_the_update_is_below_the_noise(tmp_path, make_config, tiny_model):
    """Versions closer than the sampler/learner noise cannot be told apart, and need not be: the check passes
    whether or not the push took."""
    run = _run(tmp_path, make_config, tiny_model, engines=2, noise=0.02, tol=0.1)
    run.push(0)
    for step in (1, 2, 3):
        _update(run.learner, 1e-5, seed=step)
        run.push(step)
    run.fleet.miss.add((1, 0))
    _update(run.learner, 1e-5, seed=4)
    assert run.push(4).probe["push/probe_gap"] < 0.1


def test_fp32_catches_a_stale_adapter_of_one_of_several(tmp_path, make_config, tiny_model):
    """Two adapters, two engines, exact logprobs (fp32): adapter 1 missing its push on engine 1 is named."""
    run = _run(tmp_path, make_config, tiny_model, engines=2, noise=0.0, tol=1e-3, adapters=2)
    run.push(0)
    assert run.fleet.requests[-1] == [0, 1, 0, 1]  # adapter-major, engine-minor: every (adapter, engine) pair
    _update(run.learner, 5e-6, seed=1)  # ~5e-4 nats per token: below the tolerance
    pushed = run.push(1)
    assert pushed.probe["push/probe_gap"] < 1e-5 < 1e-4 < pushed.probe["push/probe_gap_prev"] < 1e-3
    _update(run.learner, 5e-6, seed=2)
    run.fleet.miss.add((1, 1))
    with pytest.raises(RunError, match="of adapter 'a1' on engine 1 but .* from version 2"):
        run.push(2)


def _state(learner, k):
    from rl_lora.learner.lora import peft_state_dict

    return peft_state_dict(learner.adapter_sets[k])


@pytest.mark.parametrize("K", [8, 16])
def test_one_batched_probe_of_many_adapters_catches_a_stale_and_a_mixed_up_one(tmp_path, make_config, tiny_model, K):
    """K = 8 and 16 adapters (fp32): the whole push check is ONE generate call of one short completion per adapter
    (past PROBE_BUDGET adapters, of a short prompt) and one learner scoring of them, and it still names the adapter
    whose push did not take, or that serves another adapter's tensors."""
    from rl_lora.sync import PROBE_BUDGET, PROBE_PROMPT_MANY, PROBE_TOKENS, PROBE_TOKENS_MANY

    probe = tuple(range(40, 40 + PROBE_PROMPT_MANY + 6))
    run = _run(tmp_path, make_config, tiny_model, engines=1, noise=0.0, tol=1e-3, adapters=K, probe_ids=probe)
    seen = []
    result = run.fleet.result
    run.fleet.result = lambda req: seen.append([len(p) for p in req.prompt_ids_P]) or result(req)
    run.push(0)
    many = K > PROBE_BUDGET
    assert seen[-1] == [PROBE_PROMPT_MANY if many else len(probe)] * K
    assert run.fleet.sampling[-1]["max_tokens"] == min(PROBE_TOKENS_MANY if many else PROBE_TOKENS,
                                                       run.cfg.sampler.max_tokens)
    scored = []
    score = run.learner.score
    run.learner.score = lambda samples: scored.append(len(samples)) or score(samples)
    _update(run.learner, 5e-6, seed=1)
    calls = len(run.fleet.requests)
    pushed = run.push(1)
    assert len(run.fleet.requests) == calls + 1 and len(run.fleet.requests[-1]) == K and run.fleet.calls_n[-1] == 1
    assert scored == [K, K]  # the new version and the previous one, each one batch of all K adapters' probes
    assert pushed.probe["push/probe_gap"] < 1e-5 < pushed.probe["push/probe_gap_prev"] < 1e-3
    _update(run.learner, 5e-6, seed=2)
    run.fleet.miss.add((0, 5))
    with pytest.raises(RunError, match="of adapter 'a5' but .* from version 2"):
        run.push(2)
    run.fleet.miss.clear()
    run.fleet.wrong[6] = 2
    _update(run.learner, 1e-3, seed=3)
    with pytest.raises(RunError, match="of adapter 'a6'"):
        run.push(3)

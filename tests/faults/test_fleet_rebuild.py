"""LocalFleet's engine rebuilds against a stand-in engine: fast, no vLLM (the real-engine versions are in
test_faults.py). The stand-in reads back the PEFT files it is given, as vLLM does, and once closed every call on
it fails inside it (as vLLM's do after its engine core is shut down): no flag tells the fleet it is dead. Its
engine calls are wrapped by the Sampler's own `engine_call`, so they fail the way the Sampler's do; errors that
are not the engine failing (a user error, a bug in the fleet's bookkeeping) are raised, never retried."""

import threading

import pytest
import torch
from ray.exceptions import ActorDiedError, ObjectLostError, RayTaskError
from safetensors.torch import load_file

from rl_lora.errors import ConfigError, EngineError, RunError
from rl_lora.rollout import Completion
from rl_lora.sampling.fleet import LocalFleet, _engine_failure
from rl_lora.sampling.sampler import AdapterRef, engine_call

KEY = "base_model.model.layers.0.mlp.down_proj.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 1}


class StandInSampler:
    def __init__(self, root, gate=None):
        self.root, self.gate = root, gate
        self.tokenizer, self.max_model_len = None, 64
        self.engine: dict | None = {}  # version -> tensors, as read back from the adapter files
        self.live: dict[int, AdapterRef] = {}

    @engine_call
    def push(self, version, write_adapter, evict_older=True):
        path = self.root / f"{id(self)}-v{version}"
        write_adapter(path)
        self.engine[version] = load_file(str(path / "adapter_model.safetensors"))
        self.live[version] = AdapterRef(version, str(path))
        return self.live[version]

    @engine_call
    def load_weights(self, hf_state):
        self.engine["weights"] = {name: t.clone() for name, t in hf_state.items()}

    @engine_call
    def evict(self, version):
        self.engine.pop(version)
        self.live.pop(version)

    @engine_call
    def generate(self, prompt_ids_P, *, n, adapters, seed, seeds, **sampling):
        if self.gate is not None:
            self.gate.wait()
        if sampling.get("max_tokens", 0) > self.max_model_len:  # bad input: what the Sampler raises, one line
            raise ConfigError(f"max_tokens {sampling['max_tokens']} exceeds the context (model.max_model_len)")
        # a "completion" says which seed and which adapter tensors produced it
        return [[Completion([s + i], [float(self.engine[a.version][KEY].sum())], "", "length", a.version)
                 for i in range(n)] for a, s in zip(adapters, seeds)]

    def close(self):
        self.engine = None  # every later call fails with a TypeError, inside the engine


def _fleet(tmp_path, gate=None, **kwargs):
    """A LocalFleet of stand-ins; the first one waits for `gate` before each generation."""
    made = []

    def make():
        made.append(StandInSampler(tmp_path, None if made else gate))
        return made[-1]

    return LocalFleet(make, **kwargs), made


def test_a_rebuilt_engine_gets_the_pushed_tensors_not_the_learners_later_ones(tmp_path):
    fleet, made = _fleet(tmp_path)
    live = torch.zeros(4, 1)  # the learner's parameter, pushed as version 1
    fleet.push_adapter(1, 0, {KEY: live}, CONFIG)
    live.add_(1.0)  # the learner's next step, in place
    made[0].close()  # the engine dies
    (group,) = fleet.generate([[1, 2]], n=2, adapters=[AdapterRef(1, "")], seeds=[7])
    assert fleet.restarts == 1 and len(made) == 2
    assert torch.equal(made[1].engine[1][KEY], torch.zeros(4, 1))  # version 1 as pushed
    assert [c.token_ids for c in group] == [[7], [8]] and group[0].logprobs == [0.0]


def test_a_rebuilt_engine_gets_the_pushed_full_finetuning_weights(tmp_path):
    fleet, made = _fleet(tmp_path)
    live = torch.zeros(4, 4)
    for step in range(2):  # two pushes: the second reuses the first's buffers
        fleet.load_weights({"model.layers.0.mlp.down_proj.weight": live})
        live.add_(1.0)
    made[0].close()
    fleet.push_adapter(1, 0, {KEY: torch.zeros(4, 1)}, CONFIG)  # any call on the dead engine rebuilds it
    assert fleet.restarts == 1
    assert torch.equal(made[1].engine["weights"]["model.layers.0.mlp.down_proj.weight"], torch.ones(4, 4))


def test_async_a_failed_queued_generation_rebuilds_the_engine_and_is_submitted_again(tmp_path):
    """The run's order: a request queued under version 1; the engine dies under it; then the push of version 2
    (drain, load, evict 1); then the result. The push finds a rebuilt engine, and the request is sampled again
    with its own seeds, under the newest version of its adapter."""
    gate = threading.Event()
    fleet, made = _fleet(tmp_path, asynchronous=True, gate=gate)
    fleet.push_adapter(1, 0, {KEY: torch.zeros(4, 1)}, CONFIG)
    request = fleet.submit([[1, 2], [3, 4]], n=1, adapters=[AdapterRef(1, "")] * 2, seeds=[10, 20])  # held at the gate
    made[0].close()  # the engine dies while the generation runs
    gate.set()
    fleet.drain()
    fleet.push_adapter(2, 0, {KEY: torch.ones(4, 1)}, CONFIG)
    fleet.evict(1)
    groups = fleet.result(request)
    assert fleet.restarts == 1 and len(made) == 2
    assert [g[0].token_ids for g in groups] == [[10], [20]]  # the same seeds
    assert [g[0].adapter_version for g in groups] == [2, 2] and groups[0][0].logprobs == [4.0]
    fleet.close()


def test_an_engine_found_dead_by_a_push_is_rebuilt_with_that_push(tmp_path):
    fleet, made = _fleet(tmp_path)
    fleet.push_adapter(1, 0, {KEY: torch.zeros(4, 1)}, CONFIG)
    made[0].close()
    ref = fleet.push_adapter(2, 0, {KEY: torch.ones(4, 1)}, CONFIG)
    assert ref.version == 2 and fleet.restarts == 1 and sorted(made[1].engine) == [1, 2]
    fleet.evict(1)
    assert sorted(made[1].engine) == [2]


def test_a_push_that_fails_on_every_rebuilt_engine_stops_the_run_instead_of_rebuilding_each_step(tmp_path):
    """A batched push failing inside every fresh engine (once: vLLM's multiprocess engine decoded our LoRARequests
    as lists, while a rebuild's own per-adapter pushes worked) is a bug, not a death: the fleet rebuilds for it at
    most MAX_RESTARTS times, the generations in between served, then stops in one line."""
    from rl_lora.errors import FleetError
    from rl_lora.sampling.fleet import MAX_RESTARTS

    fleet, made = _fleet(tmp_path)
    fleet.push_adapter(1, 0, {KEY: torch.zeros(4, 1)}, CONFIG)

    @engine_call
    def push_many(items, evict):
        raise AttributeError("'list' object has no attribute 'lora_int_id'")

    for v in range(2, 2 + MAX_RESTARTS):
        for m in made:
            m.push_many = push_many
        fleet.push_adapters([(v, 0, {KEY: torch.ones(4, 1)}, CONFIG)], evict=[])
        (group,) = fleet.generate([[1, 2]], n=1, adapters=[AdapterRef(1, "")], seeds=[7])  # still serves
    assert fleet.restarts == MAX_RESTARTS and len(made) == 1 + MAX_RESTARTS
    made[-1].push_many = push_many
    with pytest.raises(FleetError, match="engine calls in a row"):
        fleet.push_adapters([(9, 0, {KEY: torch.ones(4, 1)}, CONFIG)], evict=[])


def test_user_errors_and_bugs_are_raised_not_taken_for_a_dead_engine(tmp_path):
    fleet, made = _fleet(tmp_path)
    fleet.push_adapter(1, 0, {KEY: torch.zeros(4, 1)}, CONFIG)
    with pytest.raises(ConfigError, match="exceeds the context"):  # raised inside the engine call: bad input
        fleet.generate([[1, 2]], n=1, adapters=[AdapterRef(1, "")], seeds=[7], max_tokens=100)
    with pytest.raises(KeyError):  # the fleet's own code (a version never pushed): a bug, not the engine
        fleet.generate([[1, 2]], n=1, adapters=[AdapterRef(5, "")], seeds=[7])
    assert fleet.restarts == 0 and len(made) == 1
    (group,) = fleet.generate([[1, 2]], n=1, adapters=[AdapterRef(1, "")], seeds=[7])  # the engine still serves
    assert group[0].token_ids == [7]


def test_engine_call_turns_failures_inside_the_engine_into_engine_error_and_lets_bad_input_through():
    @engine_call
    def dies():
        raise AssertionError("pipeline model parallel group is not initialized")  # vLLM's, once shut down

    @engine_call
    def bad_input():
        raise ValueError("prompt too long")

    with pytest.raises(EngineError, match="^AssertionError: pipeline") as err:
        dies()
    assert isinstance(err.value.__cause__, AssertionError)
    with pytest.raises(ValueError, match="prompt too long"):
        bad_input()


def test_engine_call_names_a_dead_engine_core_process_whatever_the_race_raised():
    """A SIGKILLed engine-core process can surface as a closed socket before vLLM's monitor marks the engine dead
    (seen once in CI): the error names the death, and keeps what was raised. A live process's error is as it is."""
    from types import SimpleNamespace as NS

    class Proc:
        def __init__(self, alive):
            self.alive = alive

        def is_alive(self):
            return self.alive

    class Engine:
        def __init__(self, alive):
            manager = NS(processes=[Proc(alive)])
            self.llm = NS(llm_engine=NS(engine_core=NS(resources=NS(engine_dead=False, engine_manager=manager))))

        @engine_call
        def generate(self):
            raise RuntimeError("Socket operation on non-socket")

    with pytest.raises(EngineError, match=r"^EngineDeadError: the engine-core process died \(RuntimeError: Socket"):
        Engine(alive=False).generate()
    with pytest.raises(EngineError, match="^RuntimeError: Socket"):
        Engine(alive=True).generate()


def _in_actor(cause):
    return RayTaskError("generate", "Traceback (most recent call last): ...", cause)


def test_ray_fleet_takes_only_engine_deaths_for_dead_engines():
    for dead in (ActorDiedError(), ObjectLostError("00" * 28, "owner", "call site"), _in_actor(EngineError("x"))):
        assert _engine_failure(dead) is None  # an engine died: replace it
    for user_error in (ConfigError("model.max_model_len: too small"), RunError("stopped")):
        with pytest.raises(type(user_error), match=str(user_error)) as err:
            _engine_failure(_in_actor(user_error))
        assert err.value is user_error  # as itself: the CLI prints its one line
    bug = _in_actor(KeyError(5))
    with pytest.raises(RayTaskError) as err:
        _engine_failure(bug)
    assert err.value is bug  # with the actor's traceback

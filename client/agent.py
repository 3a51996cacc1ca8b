"""fleet-agent: receives desired states, admits them, runs one deployment at a time.

The message handler only verifies, decides (`client.decide.admit`) and journals;
the deployment runs in its own task so the MQTT loop keeps serving answers and
confirmations while a switch is in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client import homeassistant as ha
from client.backend import SystemBackend
from client.control import ControlServer, socket_path
from client.decide import admit
from client.dumps import DumpStore
from client.journal import Journal, RecordedResult, encode_blob
from client.notify import NotifyConfig, PromptNotifier
from client.report import Reporter
from client.runner import DeploymentRunner, new_nonce
from client.session import AgentSession, Retained
from protocol.broker import BrokerAddress
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.models import Answer, Confirm, Desired, HostState, Prompt
from protocol.outcomes import phase_of
from protocol.signing import verify
from protocol.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    host: str
    broker: BrokerAddress
    state_dir: Path
    trusted_keys: list[Ed25519PublicKey]
    topics: Topics = field(default_factory=Topics)
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    dump_retention: int = 3
    age_recipient: str | None = None
    age_identity: str | None = None
    home_assistant: bool = False
    ha_reboot: bool = False
    control_socket: bool = True
    control_group: str | None = "wheel"
    notify: NotifyConfig = field(default_factory=NotifyConfig)


class Agent:
    def __init__(self, config: AgentConfig, backend: SystemBackend) -> None:
        self.config = config
        self.host = config.host
        self.topics = config.topics
        self.backend = backend
        self.journal = Journal(config.state_dir)
        self.dumps = DumpStore(config.state_dir, config.dump_retention, config.age_recipient,
                               config.age_identity)
        state = self.journal.open()
        self.journal.append("start", boot_id=backend.boot_id())
        # `desired` is a latest-value topic: QoS 0 means no stale copy is queued in our
        # session while we are away; the retained value arrives on every (re)subscribe.
        # Answers and confirmations are queued (QoS 1) and acked after journaling.
        subscriptions = [(self.topics.desired(self.host), 0), (self.topics.answer(self.host), 1),
                         (self.topics.confirm(self.host), 1)]
        self.ha: ha.HomeAssistantBridge | None = None
        if config.home_assistant:
            self.ha = ha.HomeAssistantBridge(self.topics, self.host, self._publish_retained,
                                             ha.load_token(config.state_dir),
                                             reboot_allowed=config.ha_reboot)
            subscriptions += [(t, 1) for t in self.ha.subscriptions()]
        self.notifier = PromptNotifier(config.notify) if config.notify.enabled else None
        self.session = AgentSession(
            config.broker,
            client_id=f"flotilla-agent-{self.host}",
            subscriptions=subscriptions,
            handler=self._handle,
            will=Retained(self.topics.online(self.host), b"offline"),
            on_connect=self._on_connect,
            extra_client_kwargs=config.client_kwargs,
        )
        self.reporter = Reporter(self.host, self.topics, self.session.publish, state.starts)
        if self.ha is not None:
            self.reporter.listeners.append(self.ha.submit_state)
        last = state.last_result
        self.reporter.state = self.reporter.state.model_copy(update={
            "system": backend.current_system() or state.system,
            "generation": state.generation,
            "last_result": last.status if last else None,
            "deployment_id": last.deployment_id if last else None,
            "phase": "idle" if last is None else phase_of(last.status),
        })
        self._pending: Desired | None = None
        self._wake = asyncio.Event()
        self._confirms: dict[str, asyncio.Future[Confirm]] = {}
        self.runner: DeploymentRunner | None = None
        self.finished: list[RecordedResult] = []

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until cancelled: the MQTT session and the deployment loop."""
        async with contextlib.AsyncExitStack() as stack:
            if self.config.control_socket:
                await stack.enter_async_context(ControlServer(
                    socket_path(self.config.state_dir), LocalControl(self),
                    group=self.config.control_group))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.session.run(), name=f"session-{self.host}")
                tg.create_task(self._deploy_loop(), name=f"deploy-{self.host}")
                if self.ha is not None:
                    tg.create_task(self.ha.run(), name=f"homeassistant-{self.host}")

    async def close(self) -> None:
        if self.session.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reporter.close(), 2.0)  # what it holds back
        await self.session.stop(graceful_payload=b"offline")
        self.journal.close()

    async def _on_connect(self) -> None:
        await self.session.publish(self.topics.online(self.host), b"online", retain=True)
        await self.reporter.host_state()
        if self.ha is not None:
            await self.ha.announce()

    async def _publish_retained(self, topic: str, payload: bytes, retain: bool) -> None:
        await self.session.publish(topic, payload, retain=retain)

    # -- incoming ----------------------------------------------------------------------
    async def _handle(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if topic == self.topics.desired(self.host):
            await self._on_desired(payload)
        elif topic == self.topics.confirm(self.host):
            self._on_confirm(payload)
        elif topic == self.topics.answer(self.host):
            await self._on_answer(payload)
        elif self.ha is not None:
            await self._on_home_assistant(topic, payload)

    async def _on_home_assistant(self, topic: str, payload: bytes) -> None:
        """Commands from Home Assistant are not signed: the broker ACL and the host's token
        (only its own discovery announced it) vouch for where they come from, and this
        agent's configuration (`ha.authorize`) says what they may do."""
        assert self.ha is not None
        cmd = await self.ha.on_message(topic, payload)
        if cmd is None or isinstance(cmd, ha.Reannounce):
            return
        prompt = self.runner.prompt if self.runner else None
        refusal = ha.authorize(cmd, prompt, reboot_allowed=self.config.ha_reboot)
        if refusal is not None:
            log.warning("%s: refused %s from Home Assistant: %s", self.host,
                        type(cmd).__name__.lower(), refusal)
            return
        if isinstance(cmd, ha.Approve):
            await self.approve("homeassistant")
        elif isinstance(cmd, ha.Answer):
            await self.submit_answer(ha.answer_model(cmd, self.host, time.time()), "homeassistant")
        elif prompt is not None and prompt.kind == "reboot":
            await self.submit_answer(Answer(host=self.host, prompt_id=prompt.prompt_id,
                                     choices={ha.REBOOT_KEY: ha.REBOOT_NOW},
                                     answered_by="homeassistant", issued_at=time.time()),
                                     "homeassistant")
        else:
            log.warning("%s: reboot pressed in Home Assistant, but no reboot is pending",
                        self.host)

    async def _on_desired(self, payload: bytes) -> None:
        if not payload:
            log.info("%s: desired state cleared", self.host)
            self._pending = None
            return
        try:
            desired: Desired = decode(payload, expect=(Desired,))
            verify(desired, self.config.trusted_keys)
        except ProtocolError as exc:
            await self.reporter.rejected(None, 0, exc.reason, str(exc))
            return
        await self._admit(desired)

    async def _admit(self, desired: Desired) -> None:
        """Act on a verified desired state (also a queued one, once the host is free)."""
        verdict = admit(desired, self.host, self.journal.state, time.time())
        if verdict.verdict == "reject":
            await self.reporter.rejected(desired.deployment_id, desired.generation,
                                         verdict.reason, verdict.message)
        elif verdict.verdict == "replay" and verdict.recorded is not None:
            await self._replay(verdict.recorded)
        elif verdict.verdict == "resume":
            pass  # already running (resumed from the journal at start)
        elif verdict.verdict == "queue":
            self._pending = desired
        else:
            self._accept(desired)

    def _accept(self, desired: Desired) -> None:
        """Journal the desired state (fsync) before we ack it or act on it."""
        self.journal.append(
            "accept", deployment_id=desired.deployment_id, generation=desired.generation,
            desired=encode_blob(encode(desired)), previous=self.backend.current_system(),
        )
        self._pending = None
        self._wake.set()

    async def _replay(self, rec: RecordedResult) -> None:
        await self.reporter.result(rec.deployment_id, rec.generation, rec.status,
                                   rec.message, rec.system, rec.needs_reboot, [])
        await self.reporter.host_state()

    def _on_confirm(self, payload: bytes) -> None:
        try:
            confirm: Confirm = decode(payload, expect=(Confirm,))
            if confirm.host != self.host:
                return
            if confirm.source == "controller":
                verify(confirm, self.config.trusted_keys)
        except ProtocolError as exc:
            log.warning("%s: ignoring confirmation: %s", self.host, exc)
            return
        key = confirm.nonce if confirm.source == "agent" else f"controller:{confirm.generation}"
        fut = self._confirms.get(key)
        if fut is not None and not fut.done():
            fut.set_result(confirm)

    async def _on_answer(self, payload: bytes) -> None:
        try:
            answer: Answer = decode(payload, expect=(Answer,))
            verify(answer, self.config.trusted_keys)
        except ProtocolError as exc:
            await self.reporter.rejected(None, 0, exc.reason, f"answer refused: {exc}")
            return
        await self.submit_answer(answer, "remote")

    async def submit_answer(self, answer: Answer, source: str) -> tuple[bool, str]:
        """Route an answer (remote, Home Assistant, local socket) to the open prompt."""
        runner = self.runner
        if answer.host != self.host:
            ok, message = False, f"answer is for host {answer.host}"
        elif runner is None:
            ok, message = False, "no deployment is waiting for an answer"
        else:
            ok, message = await runner.on_answer(answer, source)
        if not ok:  # not tied to the deployment: a refused answer does not end it
            await self.reporter.rejected(None, 0, "answer_refused",
                                         f"answer to {answer.prompt_id}: {message}")
        return ok, message

    # -- deployments -------------------------------------------------------------------
    async def _deploy_loop(self) -> None:
        while True:
            active = self.journal.state.active
            if active is None:
                await self._wake.wait()
                self._wake.clear()
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    await self._admit(pending)
                continue
            try:
                desired: Desired = decode(active.desired, expect=(Desired,))
            except ProtocolError as exc:  # never trust what we cannot read back
                self.journal.append("result", deployment_id=active.deployment_id,
                                    generation=active.generation, status="failed",
                                    message=f"journaled desired state unreadable: {exc}")
                continue
            self.runner = DeploymentRunner(self, desired)
            self.runner.on_prompt.append(self._prompt_changed)
            if self.ha is not None:
                self.ha.submit_desired(desired)
            if not active.started:
                await self.reporter.ack(desired.deployment_id, desired.generation)
            result = await self.runner.run()
            self.runner = None
            self.finished.append(result)
            if self._pending is not None:
                self._wake.set()

    async def _prompt_changed(self, prompt: Prompt | None) -> None:
        if self.ha is not None:
            answered = self.runner.active.answers if self.runner and prompt else None
            self.ha.submit_prompt(prompt, answered)
        if prompt is not None and self.notifier is not None:
            await self.notifier.prompt_opened(prompt)

    async def approve(self, source: str) -> tuple[bool, str]:
        prompt = self.runner.prompt if self.runner else None
        if prompt is None or prompt.kind != "approval":
            return False, "no deployment is waiting for approval"
        return await self.submit_answer(Answer(host=self.host, prompt_id=prompt.prompt_id,
                                        approve=True, answered_by=source,
                                        issued_at=time.time()), source)


    async def round_trip(self, generation: int, timeout: float, controller: bool) -> bool:
        """Prove the broker still routes our messages (magic rollback confirmation)."""
        nonce = new_nonce()
        key = f"controller:{generation}" if controller else nonce
        fut: asyncio.Future[Confirm] = asyncio.get_running_loop().create_future()
        self._confirms[key] = fut
        try:
            probe = Confirm(host=self.host, generation=generation, nonce=nonce)
            await asyncio.wait_for(
                self.session.publish(self.topics.confirm(self.host), encode(probe)), timeout)
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._confirms.pop(key, None)


class LocalControl:
    """The agent as seen from the local control socket (client.control.AgentControl)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def list_prompts(self) -> list[Prompt]:
        runner = self.agent.runner
        prompt = runner.prompt if runner else None
        return [prompt] if prompt is not None else []

    async def answer(self, prompt_id: str, choices: dict[str, str], source: str
                     ) -> tuple[bool, str]:
        return await self.agent.submit_answer(
            Answer(host=self.agent.host, prompt_id=prompt_id, choices=choices,
                   answered_by=source, issued_at=time.time()), source)

    async def approve(self, source: str) -> tuple[bool, str]:
        return await self.agent.approve(source)

    async def status(self) -> HostState:
        return self.agent.reporter.state

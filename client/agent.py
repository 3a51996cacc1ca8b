"""fleet-agent: receives desired states, admits them, runs one deployment at a time.

The message handler only verifies, decides (`client.receive.decide.admit`) and journals;
the deployment runs in its own task so the MQTT loop keeps serving answers and
confirmations while a switch is in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.ask import homeassistant as ha
from client.ask.control import ControlServer, socket_path
from client.ask.notify import NotifyConfig, PromptNotifier
from client.host.backend import SystemBackend
from client.journal import Journal, RecordedResult, encode_blob
from client.receive.decide import admit
from client.receive.session import AgentSession, Retained
from client.report.reporter import Reporter
from client.run.runner import DeploymentRunner, new_nonce
from client.steps.dumps import DumpStore
from protocol import prompts
from protocol.broker import BrokerCluster
from protocol.codec import decode, encode
from protocol.errors import FlotillaError, ProtocolError, StateError
from protocol.models import Answer, Cancel, Confirm, Desired, HostState, Prompt
from protocol.mqtt import Backoff, client_id
from protocol.outcomes import phase_of
from protocol.signing import verify_payload
from protocol.topics import Topics

log = logging.getLogger(__name__)
CONFIRM_RESEND_S = 2.0  # a confirmation probe not back by then is sent again


@dataclass(frozen=True)
class Incoming:
    """A verified desired state and the bytes it came in: the journal keeps those
    bytes (signature and all), not a re-encoding of what this version decoded."""

    desired: Desired
    payload: bytes


@dataclass
class AgentConfig:
    host: str
    broker: BrokerCluster
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
    tonight: str = prompts.DEFAULT_TONIGHT
    """When "tonight" is, for a user deferring an approval (host-local HH:MM)."""


class Agent:
    def __init__(self, config: AgentConfig, backend: SystemBackend) -> None:
        self.config = config
        self.host = config.host
        self.topics = config.topics
        self.backend = backend
        self.tonight = config.tonight
        self.journal = Journal(config.state_dir)
        self.dumps = DumpStore(config.state_dir, config.dump_retention, config.age_recipient,
                               config.age_identity)
        state = self.journal.open()
        self.journal.append("start", boot_id=backend.boot_id())
        # `desired` is a latest-value topic: QoS 0 means no stale copy is queued in our
        # session while we are away; the retained value arrives on every (re)subscribe.
        # Confirmations are only of use while a probe waits, which is sent again until
        # one returns: QoS 0. Answers and cancels are queued (QoS 1) and acked after
        # journaling, but only while a deployment is active (`_deploy_loop` takes and
        # drops that subscription): an idle host's session queues nothing, and on NATS,
        # where each QoS 1 subscription is a JetStream consumer, 10,000 idle hosts need
        # none (creating one per host at connect kept a 3-node cluster from ever
        # getting 10,000 agents online).
        subscriptions = [(self.topics.desired(self.host), 0),
                         (self.topics.confirm(self.host), 0)]
        self.ha: ha.HomeAssistantBridge | None = None
        if config.home_assistant:
            self.ha = ha.HomeAssistantBridge(self.topics, self.host, self._publish_retained,
                                             ha.load_token(config.state_dir),
                                             reboot_allowed=config.ha_reboot)
            # QoS 0 too: a command is for now. One sent while the host is away (Home
            # Assistant shows it unavailable) is not queued and carried out on return.
            subscriptions += [(t, 0) for t in self.ha.subscriptions()]
        self.notifier = PromptNotifier(config.notify) if config.notify.enabled else None
        self.session = AgentSession(
            config.broker,
            client_id=client_id("flotilla-agent", self.host),
            subscriptions=subscriptions,
            handler=self._handle,
            will=Retained(self.topics.online(self.host), b"offline"),
            on_connect=self._on_connect,
            extra_client_kwargs=config.client_kwargs,
            retry_latest=(self.topics.desired(self.host),),
            # an answer subscription an earlier run (or version) left behind
            stale=(self.topics.answer(self.host),) if state.active is None else (),
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
        self._pending: Incoming | None = None
        self._accepted: Desired | None = None  # decoded, until the deploy loop takes it
        self._queued_backoff = Backoff(base=0.5, cap=30.0)
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
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.session.run(), name=f"session-{self.host}")
                    tg.create_task(self._deploy_loop(), name=f"deploy-{self.host}")
                    if self.ha is not None:
                        tg.create_task(self.ha.run(), name=f"homeassistant-{self.host}")
            except ExceptionGroup as group:
                # A refusal (BrokerRefused) or a missing capability: no retry can fix it
                refused: BaseException | None = group.subgroup(FlotillaError)
                if refused is None:
                    raise
                while isinstance(refused, BaseExceptionGroup):  # the CLI prints one line
                    refused = refused.exceptions[0]
                raise refused from None

    async def close(self) -> None:
        if self.session.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reporter.close(), 2.0)  # what it holds back
        await self.session.stop(graceful_payload=b"offline")
        self.journal.close()

    async def _on_connect(self) -> None:
        await self.session.publish(self.topics.online(self.host), b"online", retain=True)
        await self.reporter.host_state()
        if self.journal.state.active is None:  # else its runner owns the prompt
            await self.reporter.clear_stale_prompt()
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
        refusal = ha.authorize(cmd, self.open_prompt, reboot_allowed=self.config.ha_reboot)
        if refusal is not None:
            log.warning("%s: refused %s from Home Assistant: %s", self.host,
                        type(cmd).__name__.lower(), refusal)
            return
        if isinstance(cmd, ha.Approve):
            await self.approve("homeassistant", kinds=("approval",))
        elif isinstance(cmd, ha.Answer):
            await self.submit_answer(ha.answer_model(cmd, self.host, time.time()), "homeassistant")
        elif isinstance(cmd, ha.Reboot):
            ok, message = await self.approve("homeassistant", kinds=("reboot",))
            if not ok:
                log.warning("%s: reboot pressed in Home Assistant: %s", self.host, message)

    async def _on_desired(self, payload: bytes) -> None:
        if not payload:
            log.info("%s: desired state cleared", self.host)
            self._pending = None
            return
        try:
            desired: Desired = decode(payload, expect=(Desired,))
        except ProtocolError as exc:
            await self.reporter.rejected(None, 0, exc.reason, str(exc))
            return
        try:
            verify_payload(payload, self.config.trusted_keys)
        except ProtocolError as exc:
            # The ids are the body's claims (unverified), so the controller that sent it
            # counts this host as rejected now instead of waiting for its --timeout.
            await self.reporter.rejected(desired.deployment_id, desired.generation, exc.reason,
                                         f"{exc} (deployment id and generation unverified)",
                                         unverified=True)
            return
        await self._admit(Incoming(desired, payload))

    async def _admit(self, incoming: Incoming) -> None:
        """Act on a verified desired state (also a queued one, once the host is free)."""
        desired = incoming.desired
        verdict = admit(desired, self.host, self.journal.state, time.time())
        if verdict.verdict == "reject":
            await self.reporter.rejected(desired.deployment_id, desired.generation,
                                         verdict.reason, verdict.message)
        elif verdict.verdict == "replay" and verdict.recorded is not None:
            await self._replay(verdict.recorded)
        elif verdict.verdict == "resume":
            pass  # already running (resumed from the journal at start)
        elif verdict.verdict == "queue":
            # A newer desired state supersedes the running deployment's wait (approval,
            # choice, reboot); the deployment ends and this one starts.
            self._pending = incoming
            if self.runner is not None:
                self.runner.cancel(f"superseded by deployment {desired.deployment_id}")
        else:
            await self._accept(incoming)

    async def _accept(self, incoming: Incoming) -> None:
        """Journal the desired state (fsync) before we ack it or act on it."""
        desired = incoming.desired
        try:
            self.journal.append(
                "accept", deployment_id=desired.deployment_id, generation=desired.generation,
                desired=encode_blob(incoming.payload), previous=self.backend.current_system(),
                previous_generation=self.journal.state.generation,
            )
        except StateError as exc:
            await self._unrecordable(desired, exc)
            return
        self._pending = None
        self._accepted = desired
        self._wake.set()

    async def _unrecordable(self, desired: Desired, exc: StateError) -> None:
        """The journal cannot take the desired state (disk full): record why in the space
        the journal's reserve gave back, report a failed Result, and keep serving."""
        message = f"cannot record the desired state: {exc}"
        log.error("%s: deployment %s: %s", self.host, desired.deployment_id, message)
        try:
            self.journal.append("result", deployment_id=desired.deployment_id,
                                generation=desired.generation, status="failed",
                                message=message)
        except StateError as again:
            log.error("%s: cannot record the failure either: %s", self.host, again)
        self._pending = None
        await self.reporter.result(desired.deployment_id, desired.generation, "failed",
                                   message, self.backend.current_system(), False, [])
        await self.reporter.host_state(phase="failed", last_result="failed", message=message,
                                       deployment_id=desired.deployment_id,
                                       rollout_id=desired.rollout_id,
                                       desired_generation=desired.generation)

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
                verify_payload(payload, self.config.trusted_keys)
        except ProtocolError as exc:
            log.warning("%s: ignoring confirmation: %s", self.host, exc)
            return
        fut = self._confirms.get(confirm_key(confirm.source, confirm.nonce, confirm.generation))
        if fut is not None and not fut.done():
            fut.set_result(confirm)
        elif confirm.source == "controller":
            log.warning("%s: ignoring a controller confirmation of generation %d that answers"
                        " no open confirm round (replayed or late)", self.host,
                        confirm.generation)

    async def _on_answer(self, payload: bytes) -> None:
        try:
            message = decode(payload, expect=(Answer, Cancel))
            assert isinstance(message, Answer | Cancel)
            verify_payload(payload, self.config.trusted_keys)
        except ProtocolError as exc:
            await self.reporter.rejected(None, 0, exc.reason, f"answer refused: {exc}")
            return
        if isinstance(message, Cancel):
            ok, text = await self.cancel(message)
            if not ok:
                await self.reporter.rejected(message.deployment_id, 0, "cancel_refused", text)
            return
        await self.submit_answer(message, "remote")

    async def cancel(self, cancel: Cancel) -> tuple[bool, str]:
        """`fleetctl cancel`: drop a queued desired state (recorded `cancelled`) and end the
        running deployment's wait (the machine records how it ends)."""
        if cancel.host != self.host:
            return False, f"cancel is for host {cancel.host}"
        reason = f"cancelled by {cancel.cancelled_by or 'the controller'}" + (
            f": {cancel.reason}" if cancel.reason else "")
        done = []
        pending = self._pending.desired if self._pending is not None else None
        if pending is not None and cancel.deployment_id in (None, pending.deployment_id):
            self._pending = None
            self.journal.append("result", deployment_id=pending.deployment_id,
                                generation=pending.generation, status="cancelled",
                                message=reason)
            await self.reporter.result(pending.deployment_id, pending.generation, "cancelled",
                                       reason, self.backend.current_system(), False, [])
            done.append(pending.deployment_id)
        runner = self.runner
        if runner is not None and cancel.deployment_id in (None, runner.d.deployment_id):
            runner.cancel(reason)
            done.append(runner.d.deployment_id)
        if not done:
            return False, "nothing to cancel: no deployment is queued or running"
        return True, f"cancelling {', '.join(done)}"

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
                self.session.unwant(self.topics.answer(self.host))
                await self._wake.wait()
                self._wake.clear()
                if self._pending is not None:
                    await self._admit_queued()
                continue
            accepted, self._accepted = self._accepted, None
            if accepted is not None and accepted.deployment_id == active.deployment_id:
                desired = accepted  # just journaled: the same bytes, already checked
            else:
                try:
                    desired = decode(active.desired, expect=(Desired,))
                except ProtocolError as exc:  # never trust what we cannot read back
                    self.journal.append("result", deployment_id=active.deployment_id,
                                        generation=active.generation, status="failed",
                                        message=f"journaled desired state unreadable: {exc}")
                    continue
            # Before the Ack: whoever learns of the deployment from it (and answers or
            # cancels) publishes after our SUBSCRIBE went out on this connection.
            await self.session.want(self.topics.answer(self.host), 1)
            if not active.started:
                await self.reporter.ack(desired.deployment_id, desired.generation)
            self.runner = DeploymentRunner(self, desired)
            self.runner.on_prompt.append(self._prompt_changed)
            if self.ha is not None:
                self.ha.submit_desired(desired)
            result = await self.runner.run()
            self.runner = None
            self.finished.append(result)
            if self._pending is not None:
                self._wake.set()

    @property
    def open_prompt(self) -> Prompt | None:
        return self.runner.open_prompt if self.runner is not None else None

    async def _admit_queued(self) -> None:
        """The queued desired state, once the host is free; kept (and tried again with
        backoff) when accepting it fails, never dropped."""
        pending, self._pending = self._pending, None
        assert pending is not None
        try:
            await self._admit(pending)
            self._queued_backoff.reset()
        except Exception:
            log.exception("%s: cannot accept queued generation %d yet; will retry",
                          self.host, pending.desired.generation)
            if self._pending is None:
                self._pending = pending
            await asyncio.sleep(self._queued_backoff.next_delay())
            self._wake.set()

    async def _prompt_changed(self, prompt: Prompt | None) -> None:
        if self.ha is not None:
            answered = self.runner.prompt_answers() if self.runner and prompt else None
            self.ha.submit_prompt(prompt, answered)
        if prompt is not None and self.notifier is not None:
            await self.notifier.prompt_opened(prompt)

    async def approve(self, source: str, defer: str | None = None,
                      kinds: tuple[str, ...] = ("approval", "reboot")) -> tuple[bool, str]:
        """Approve the waiting deploy, or start its pending reboot now; with `defer`
        (an approval's deferral choice) put the approval off instead."""
        prompt = self.open_prompt
        if prompt is None or prompt.kind not in kinds:
            what = " or ".join({"approval": "approval", "reboot": "a reboot"}[k] for k in kinds)
            return False, f"no deployment is waiting for {what}"
        if defer is not None:
            return await self.submit_answer(Answer(
                host=self.host, prompt_id=prompt.prompt_id,
                choices={prompts.APPROVE_KEY: defer}, answered_by=source,
                issued_at=time.time()), source)
        return await self.submit_answer(Answer(host=self.host, prompt_id=prompt.prompt_id,
                                        approve=True, answered_by=source,
                                        issued_at=time.time()), source)


    async def listening(self, waiting: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Until answers and cancels reach us: the `answer` subscription is granted.
        While the broker refuses it (its ACL, or a NATS cluster too busy to create the
        consumer behind it), `waiting(why)` is told each time, for the operator: a
        prompt published now could never be answered."""
        topic = self.topics.answer(self.host)

        async def refused(times: int) -> None:
            if waiting is not None:
                await waiting(f"the broker refused the subscription to {topic} "
                              f"({times}x); answers cannot reach this host, so its prompt "
                              "waits until the broker grants it (check the broker's ACL "
                              "for this host's answer topic; a busy NATS cluster refuses "
                              "for a while too)")

        await self.session.subscribed(topic, refused)

    async def round_trip(self, generation: int, timeout: float, controller: bool) -> bool:
        """Prove the broker still routes our messages (magic rollback confirmation)."""
        nonce = new_nonce()
        key = confirm_key("controller" if controller else "agent", nonce, generation)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Confirm] = loop.create_future()
        self._confirms[key] = fut
        deadline = loop.time() + timeout
        payload = encode(Confirm(host=self.host, generation=generation, nonce=nonce))
        try:
            # QoS 0, sent again every CONFIRM_RESEND_S until it comes back: a probe needs
            # no acknowledgement of its own (half the packets of QoS 1), and a lost one
            # is simply followed by the next.
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                await asyncio.wait_for(
                    self.session.publish(self.topics.confirm(self.host), payload, qos=0),
                    remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut),
                                           min(CONFIRM_RESEND_S, deadline - loop.time()))
                    return True
        except TimeoutError:
            return False
        finally:
            self._confirms.pop(key, None)


def confirm_key(source: str, nonce: str, generation: int) -> str:
    """The confirm round a Confirm answers. A round's nonce is new each time, so a signed
    controller Confirm from another round (or for another generation) answers nothing."""
    return nonce if source == "agent" else f"controller:{generation}:{nonce}"


class LocalControl:
    """The agent as seen from the local control socket (client.ask.control.AgentControl)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def list_prompts(self) -> list[Prompt]:
        prompt = self.agent.open_prompt
        return [prompt] if prompt is not None else []

    async def answer(self, prompt_id: str, choices: dict[str, str], source: str
                     ) -> tuple[bool, str]:
        return await self.agent.submit_answer(
            Answer(host=self.agent.host, prompt_id=prompt_id, choices=choices,
                   answered_by=source, issued_at=time.time()), source)

    async def approve(self, source: str, defer: str | None = None) -> tuple[bool, str]:
        return await self.agent.approve(source, defer)

    async def status(self) -> HostState:
        return self.agent.reporter.state

"""
Step 4, activate: ``switch-to-configuration dry-activate`` first, always, with its report
shown (before an activation, in the round trip that starts it: nothing starts unless it
passed); then the activation itself, safely (``activate_safely``):

1. it runs on the target detached from the SSH session, as its own watchdog
   (``operations.push.switch``); the controller follows its output, logging in anew when the
   connection drops, until the outcome is known;
2. once it awaits confirmation, the controller runs the host's health checks
   (``operations.data.health``), then confirms over a *new* SSH login (``fresh_login_run``: a
   connection of its own, made as pyinfra makes one from the host's own address, port, user,
   key and known hosts): that a new login works is part of what is confirmed. A failed check
   rejects at once;
3. the outcome: ``deployed``, ``rolled-back: <cause>`` (the host is verified to run its
   previous system again; ``restarted before confirmation: still on <old>`` when the run
   vanished with the host's /run) or ``failed`` (with the cause and what the host runs now).

Only one activation runs on a host at a time (the program holds the host's lock): a launch
waits for a pending one up to ``ActivationRun.lock_wait`` seconds, then fails naming it. A
host whose health checks may outlast the confirmation window is refused when its safety is
checked at plan time (``check_window``), with the numbers.

With more than one ``deploy_wave`` in the run, the activation launches only once every host
of the earlier waves deployed and, ``wave_soak`` seconds later, passed its health checks again
(``operations.push.waves``); otherwise the host is ``held`` and nothing starts on it.

With ``reboot`` data (``when-needed``, ``always``), a confirmed ``switch`` is followed by a
reboot, in the same step (``operations.push.reboot``): its outcome is the host's, and a later
wave waits for it.

``boot`` gets no automatic rollback: nothing can be confirmed without a reboot.
``deploy_action=rollback`` (``plan.plan_rollback``) goes back to the previous generation, the
same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, StringCommand
from pyinfra.api.operation import operation
from pyinfra.context import host

from operations.builder.nix_commands import nix_error
from operations.core.failures import fail, host_step
from operations.core.models import Action, Plan, Safety
from operations.core.process import drop_connection, fresh_login_run, run_on
from operations.core.runstate import summary_for
from operations.data.fleet import FleetError
from operations.data.health import RETRY_INTERVAL, HealthCheck
from operations.data.reboot import Reboot, RebootPolicy
from operations.data.steady import runs_systemd
from operations.push.commands import switch_command
from operations.push.health import CURL_PROBE, curl_problem, has_credentials, run_checks
from operations.push.reboot import RebootRun, reboot_after_switch
from operations.push.switch import (
    AWAITING,
    CONFIRMED_MARK,
    DRY_ACTIVATED_MARK,
    LAUNCHED_MARK,
    PENDING_MARK,
    PROGRAM,
    TERMINAL,
    TOO_LATE,
    ActivationRun,
    confirm_and_follow_command,
    decode_output,
    dry_activate_and_launch_command,
    encoded_command,
    follow_command,
    parse_follow,
    pending_activation,
    reject_command,
    split_at_mark,
)
from operations.push.waves import Waves

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State


@operation()
def dry_activate(plan: Plan, sudo: bool) -> Generator[PyinfraCommand, None, None]:
    """
    Run ``switch-to-configuration dry-activate`` and show its report; changes nothing. For
    ``deploy_action=dry-activate``: before an activation it is a no-op, ``activate_safely``
    dry-activates first itself, in the round trip that starts it.

    + plan: the target's ``Plan``
    + sudo: run it with sudo (a non-root deploy user)

    **Example:**

    .. code:: python

        activate.dry_activate(plan=plan, sudo=True)
    """
    if plan.up_to_date or not plan.action.contacts_target:
        host.noop(plan.noop_reason if plan.up_to_date else "build only: nothing to activate")
        return
    if plan.action.activates:
        host.noop("the activation dry-activates first (activate_safely)")
        return
    yield FunctionCommand(_dry_activate, (plan, sudo), {})


@host_step
def _dry_activate(state: State, host: Host, plan: Plan, sudo: bool) -> bool:
    ok, lines = run_on(
        host,
        encoded_command(switch_command(plan.desired, "dry-activate")),
        sudo=sudo,
        doing=f"dry-activating {plan.desired}",
    )
    problem = _show_dry_activation(host, plan, ok, decode_output(lines))
    return fail(host, problem) if problem else True


def _show_dry_activation(host: Host, plan: Plan, ok: bool, lines: Sequence[str]) -> str | None:
    """Log a dry activation's report; what went wrong when it failed."""
    for line in lines:
        host.log_styled(f"dry-activate: {line}", log_func=logger.info)
    return None if ok else f"dry-activate of {plan.desired} failed: {nix_error(lines)}"


# How long one follow command waits on the target for news.
FOLLOW_WAIT = 5
# Beyond activation + confirmation (+ a rollback's own activation), how long the controller
# keeps trying to learn the outcome after losing contact.
GRACE = 60
CONFIRM_ATTEMPTS = 3


def check_window(host: Host, safety: Safety, checks: Sequence[HealthCheck]) -> None:
    """Stop the run (``FleetError``, naming the numbers and the fix) when ``checks``, those the
    activation runs, may outlast the confirmation window; whether unit checks run needs the
    host's systemd, so this is checked at plan time, not with the rest of the host's data."""
    if not safety.rollback or not checks:
        return
    problem = window_problem(safety, checks, runs_systemd())
    if problem:
        raise FleetError([f"{host.name}: {problem}"])


def window_problem(safety: Safety, checks: Sequence[HealthCheck], systemd: bool) -> str | None:
    """Why ``checks`` (those that run: unit checks need systemd) may outlast the confirmation
    window, with the numbers; None when their worst case fits in it."""
    running = [check for check in checks if systemd or not check.needs_systemd]
    worst = sum(check.worst_case for check in running)
    if worst <= safety.confirm_timeout:
        return None
    each = ", ".join(f"{check.name} {check.worst_case:g}s" for check in running)
    return (
        f"health_checks take up to {worst:g}s ({each}; each (retries + 1) x timeout + retries "
        f"x {RETRY_INTERVAL:g}s), longer than confirm_timeout ({safety.confirm_timeout}s): "
        f"set confirm_timeout to {math.ceil(worst)} or more, or lower the checks' timeout or "
        "retries"
    )


def describe(plan: Plan, safety: Safety, checks: Sequence[HealthCheck]) -> list[str]:
    """What the activation will do to stay safe, for the plan's log (``--dry`` shows it)."""
    if plan.up_to_date or not plan.action.activates:
        return []
    if safety.rollback:
        guard = (
            f"rollback armed: the target rolls back unless confirmed within "
            f"{safety.confirm_timeout}s over a new SSH login"
        )
        if plan.action.sets_profile:
            guard += " (activated as test; what it boots changes only once confirmed)"
    elif not plan.action.confirmable:
        guard = "no automatic rollback for boot (nothing can be confirmed without a reboot)"
    else:
        guard = "rollback off (rollback: False): a failure leaves the new system in place"
    lines = [f"{guard}; activation timeout {safety.activation_timeout}s"]
    if checks:
        lines += [f"health check {check.description}" for check in checks]
    else:
        lines.append("no health checks (health_checks)")
    return lines


def announce(target: Host, plan: Plan, safety: Safety, checks: Sequence[HealthCheck]) -> None:
    """Log ``describe``'s lines for the target (deploy code, prepare time: ``--dry`` shows them)."""
    for line in describe(plan, safety, checks):
        target.log_styled(line, log_func=logger.info)


@dataclass
class Channel:
    """
    Runs commands on the target: over pyinfra's connection while it works, then (after it
    failed once: a cut link makes it unreliable) over a new SSH login each time
    (``fresh_login_run``). ``run`` returns None when the target could not be reached.
    """

    host: Host
    sudo: bool
    fresh: bool = False
    notes: list[str] = field(default_factory=list)

    def run(
        self, command: StringCommand, timeout: float, stdin: str | None = None
    ) -> tuple[bool, list[str]] | None:
        if not self.fresh:
            kwargs: dict[str, Any] = {"_sudo": self.sudo, "_timeout": timeout}
            if stdin is not None:
                kwargs["_stdin"] = stdin
            try:
                with gevent.Timeout(timeout + 5):
                    ok, output = self.host.run_shell_command(command, **kwargs)
                return ok, output.output_lines
            except (Exception, gevent.Timeout) as error:  # paramiko, socket, timeout: all "lost"
                self.fresh = True
                self.notes.append(f"{type(error).__name__}: {error}".strip(": "))
                return None
        return fresh_login_run(self.host, command, sudo=self.sudo, timeout=timeout, stdin=stdin)


@dataclass(frozen=True)
class Outcome:
    """``deployed``, ``rolled-back`` or ``failed``, and why."""

    status: str
    cause: str = ""


def judge(
    plan: Plan,
    status: dict[str, str],
    note: str = "",
    seen: bool = False,
    rolls_back: bool = False,
) -> Outcome:
    """
    The outcome of a finished run from its last status (with the links read by the follow
    command), the controller's own reason for not confirming (``note``), whether the run
    was ``seen`` on the target before (its run directory gone since: the host restarted) and
    whether it ``rolls_back`` (armed: a failure that leaves the new system is no choice).
    """
    state = status.get("state", "")
    current, profile = status.get("current") or None, status.get("profile") or None
    # What ran and booted before, as the program found it (another run may have changed it
    # since the plan was made), else as planned.
    previous = status.get("previous", plan.current or "") or None
    previous_profile = status.get("previous-profile", plan.profile or "") or None
    cause = status.get("cause", "")
    runs = f"it now runs {current or 'nothing'}"
    action = plan.action
    if state in ("confirmed", "done"):
        if action.makes_current and current != plan.desired:
            return Outcome("failed", f"after {action}, /run/current-system is {current}")
        if action.sets_profile and profile != plan.desired:
            return Outcome("failed", f"after {action}, the system profile is {profile}")
        return Outcome("deployed")
    if state == "rolled-back":
        if note and cause.startswith("no confirmation"):
            cause = f"{cause} ({note})"
        if current != previous or (action.sets_profile and profile != previous_profile):
            return Outcome("failed", f"rolled back after {cause}, but {runs}")
        return Outcome("rolled-back", cause)
    if state == "rollback-failed":
        return Outcome("failed", f"rolling back after {cause} failed; {runs}")
    if state == "failed":
        kept = ""
        if current == plan.desired:
            kept = (
                " (the new system runs, unconfirmed: it did not roll back)"
                if rolls_back
                else " (rollback is off: the new system stays)"
            )
        return Outcome("failed", f"{cause}{kept}; {runs}")
    if state == "missing" and seen:
        # Its run directory (in /run) is gone: the host restarted (or /run was emptied).
        if action != "boot" and profile == plan.profile and profile != plan.desired:
            return Outcome("rolled-back", f"restarted before confirmation: still on {profile}")
        return Outcome(
            "failed",
            f"the target restarted during the activation; it boots {profile or 'nothing'} and "
            f"{runs}",
        )
    if state == "missing":
        return Outcome("failed", "the activation did not start on the target")
    return Outcome("failed", f"activation outcome unknown (last state: {state or 'none'})")


# -- the operation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """
    One target's activation, as ``activate_safely`` hands it to the controller's side.

    + plan, safety, checks, sudo: as for ``activate_safely``
    + systemd: the target has systemd (a transient unit; ``units`` checks run)
    + waves, soak: the run's activation waves and the host's ``wave_soak`` (``activate_safely``)
    + reboot: the host's ``reboot`` data (a confirmed ``switch`` may be followed by a reboot)
    """

    plan: Plan
    safety: Safety
    checks: tuple[HealthCheck, ...]
    sudo: bool
    systemd: bool
    waves: Waves | None = None
    soak: int = 0
    reboot: Reboot | None = None


@operation(is_idempotent=False)
def activate_safely(
    plan: Plan,
    safety: Safety,
    checks: Sequence[HealthCheck],
    sudo: bool,
    waves: Waves | None = None,
    soak: int = 0,
    reboot: Reboot | None = None,
) -> Generator[PyinfraCommand, None, None]:
    """
    Activate the plan's system detached from the SSH session, with health checks, a
    confirmation over a new SSH login and the target's own rollback (see the module's doc).

    + plan: the target's ``Plan`` (``switch``, ``boot``, ``test`` or ``rollback``)
    + safety: ``spec.safety(plan.action)``
    + checks: ``spec.health_checks``
    + sudo: run with sudo (a non-root deploy user)
    + waves: the run's activation waves (``RunCache.waves``; the deploy code ``join``ed the
      host): launch only once the earlier waves passed, and report this host's result
    + soak: ``spec.wave_soak``: once deployed, when a later wave waits, seconds to wait before
      the health checks run again
    + reboot: ``spec.reboot``: once a ``switch`` is confirmed, reboot when it asks for it
      (``operations.push.reboot``), verify what booted and run the health checks again

    **Example:**

    .. code:: python

        activate.activate_safely(plan=plan, safety=spec.safety(plan.action),
                                 checks=spec.health_checks, sudo=spec.sudo)
    """
    if plan.up_to_date or not plan.action.activates:
        host.noop(plan.noop_reason if plan.up_to_date else f"{plan.action}: no activation")
        return
    activation = Activation(plan, safety, tuple(checks), sudo, runs_systemd(), waves, soak, reboot)
    yield FunctionCommand(_activate, (activation,), {})


def worst_case(
    safety: Safety, checks: Sequence[HealthCheck], soak: int, reboot: Reboot | None = None
) -> float:
    """The longest one activation may keep a later wave waiting: the launch (waiting for the
    host's lock), following it to its outcome, a reboot and its checks, the soak and its
    health checks."""
    lock_wait = safety.confirm_timeout + safety.activation_timeout
    launch = safety.activation_timeout + 60 + FOLLOW_WAIT + lock_wait
    follow = 4 * safety.activation_timeout + safety.confirm_timeout + GRACE
    checking = sum(check.worst_case for check in checks)
    rebooting = 0.0
    if reboot is not None and reboot.policy is not RebootPolicy.NEVER:
        # preparing, the command, the wait, the checks again, committing or rolling back
        rebooting = 60 + 30 + reboot.timeout + checking + 120
    return launch + follow + rebooting + soak + checking


def _activate(state: State, host: Host, activation: Activation) -> bool:
    waves = activation.waves
    wave = waves.wave_of(host.name) if waves is not None else None
    if waves is None or wave is None or not waves.many:
        return _activate_now(state, host, activation)
    held = waves.wait_turn(host.name, wave, lambda: [h.name for h in state.failed_hosts])
    if held is not None:
        waves.report(host.name, f"{host.name} held")
        host.log_styled(f"held: {held}", fg="yellow", log_func=logger.error)
        summary_for(state).held(host.name, held)
        return False
    trouble: str | None = f"{host.name} failed"
    try:
        ok = _activate_now(state, host, activation)
        if host.name in summary_for(state).rollbacks:
            trouble = f"{host.name} rolled back"
        elif ok and waves.has_later(wave):
            problem = _soak(host, activation, wave)
            ok = fail(host, problem) if problem else True
        if ok:
            trouble = None
        return ok
    finally:  # always: a later wave waits for it
        waves.report(host.name, trouble)


def _activate_now(state: State, host: Host, activation: Activation) -> bool:
    plan = activation.plan
    try:
        outcome = _follow_activation(host, activation)
    except Exception as error:  # never a traceback out of a deploy
        outcome = Outcome("failed", f"activation broke off: {type(error).__name__}: {error}")
    if outcome.status == "deployed":
        verb = "runs" if plan.action.makes_current else "boots"
        host.log_styled(f"{plan.target} now {verb} {plan.desired}", log_func=logger.info)
        outcome = _reboot_if_wanted(state, host, activation)
    if outcome.status == "deployed":
        return True
    if outcome.status == "rolled-back":
        host.log_styled(f"rolled back: {outcome.cause}", fg="yellow", log_func=logger.error)
        summary_for(state).rolled_back(host.name, outcome.cause)
        return False
    return fail(host, outcome.cause)


def _reboot_if_wanted(state: State, host: Host, activation: Activation) -> Outcome:
    """After a confirmed ``switch``: reboot when the ``reboot`` data asks for it (``when-needed``
    reboots only when the new system's boot files are known to differ), and the outcome."""
    plan, reboot = activation.plan, activation.reboot
    summary = summary_for(state)
    if reboot is None or plan.action is not Action.SWITCH:
        return Outcome("deployed")
    if not reboot.wanted(bool(summary.reboots.get(host.name))):
        return Outcome("deployed")
    run = RebootRun(plan, reboot, activation.checks, activation.systemd, activation.sudo)
    try:
        after = reboot_after_switch(host, run, lambda m: _say(host, m))
    except Exception as error:  # never a traceback out of a deploy
        return Outcome("failed", f"the reboot broke off: {type(error).__name__}: {error}")
    finally:
        # Its sshd restarted (or went away): pyinfra's connection is dead either way.
        drop_connection(host)
    if after.status != "deployed":
        return Outcome(after.status, after.cause)
    summary.rebooted(host.name)
    host.log_styled(f"{plan.target} rebooted into {plan.desired}, healthy", log_func=logger.info)
    # Later steps (pruning) run over pyinfra's connection: a new one to the rebooted host.
    host.connect(reason="after the reboot")
    if not host.connected:
        return Outcome("failed", f"it rebooted into {plan.desired}, but pyinfra could not connect")
    return Outcome("deployed")


def _soak(host: Host, activation: Activation, wave: int) -> str | None:
    """Wait ``soak`` seconds, then run the health checks again (and check the host still runs
    the new system): why the next wave must not start, else None. Confirmed before, so a
    failure here leaves the host on its new system: it fails the wave, not the host's switch."""
    plan, soak = activation.plan, activation.soak
    host.log_styled(
        f"wave {wave} deployed here: soaking {soak}s, then health checks again before the next "
        "wave",
        log_func=logger.info,
    )
    gevent.sleep(soak)
    channel = Channel(host, activation.sudo)
    problem = run_checks(
        activation.checks,
        systemd=activation.systemd,
        run=channel.run,
        log=lambda m: host.log_styled(f"after the soak: {m}", log_func=logger.info),
    )
    if problem is None and plan.action.makes_current:
        answer = channel.run(StringCommand("readlink", "-f", "/run/current-system"), 20)
        now = answer[1][0].strip() if answer and answer[0] and answer[1] else None
        if now != plan.desired:
            problem = f"it runs {now or 'an unknown system'}, not {plan.desired}"
    if problem is None:
        return None
    return f"{problem}, {soak}s after its confirmation (wave_soak): it stays on {plan.desired}"


@dataclass
class Following:
    """What the controller knows of one activation run while it follows it.

    + seen: output lines shown so far
    + known: the last state read (``""`` before any)
    + status: the last status read
    + note: why the controller did not confirm (for the outcome), else ``""``
    + ran: the run is known to have started on the target (its run directory gone since
      means the host restarted): once the launch answered, or a follow saw it
    + pending: an answer already in hand (the launch's or the confirmation's first follow)
    """

    seen: int = 0
    known: str = ""
    status: dict[str, str] = field(default_factory=dict)
    note: str = ""
    ran: bool = False
    pending: tuple[bool, list[str]] | None = None


def _follow_activation(host: Host, activation: Activation) -> Outcome:
    run = ActivationRun.create(activation.plan, activation.safety, activation.systemd)
    channel = Channel(host, activation.sudo)
    refused = _lacks_curl(channel, activation.checks)
    if refused is not None:
        return Outcome("failed", f"{refused}; nothing was activated")
    launched = _launch(channel, run, activation.plan)
    if isinstance(launched, Outcome):
        return launched
    lost = _follow(channel, run, activation, launched)
    return lost or _finish(channel, run, activation, launched)


def _lacks_curl(channel: Channel, checks: Sequence[HealthCheck]) -> str | None:
    """Before anything changes: why a URL check with credentials could not run on the target
    (it has no curl, the one fetcher that takes them on stdin), else None. A target that does
    not answer goes on to the launch, which finds out what it can."""
    needing = [check for check in checks if has_credentials(check)]
    if not needing:
        return None
    answer = channel.run(CURL_PROBE, 20)
    if answer is None or answer[0]:
        return None
    return curl_problem(needing[0])


def _say(host: Host, text: str, **style: Any) -> None:
    host.log_styled(text, log_func=logger.info, **style)


def _launch(channel: Channel, run: ActivationRun, plan: Plan) -> Outcome | Following:
    """Dry-activate, launch and the first follow: one round trip; no launch unless the dry
    activation passed. How following starts, or the outcome when nothing started."""
    host = channel.host
    launched = channel.run(
        dry_activate_and_launch_command(run, FOLLOW_WAIT),
        timeout=run.safety.activation_timeout + 60 + FOLLOW_WAIT + run.lock_wait,
        stdin=PROGRAM,
    )
    if launched is None:  # no answer: it may have started; following tells
        return Following()
    ok, lines = launched
    report, launch_lines = split_at_mark(decode_output(lines), DRY_ACTIVATED_MARK)
    problem = _show_dry_activation(host, plan, launch_lines is not None, report)
    if launch_lines is None:
        return Outcome("failed", problem or "dry-activate failed")
    how = f"systemd unit {run.unit}" if run.systemd else f"setsid, output in {run.dir}/output"
    _say(host, f"activating detached from this session ({how})")
    _, first_answer = split_at_mark(launch_lines, LAUNCHED_MARK)
    _, holder = split_at_mark(launch_lines, PENDING_MARK)
    if first_answer is None and holder is not None:
        return Outcome("failed", pending_cause(pending_activation(holder, held=True), run))
    if first_answer is None:
        detail = next((x.strip() for x in reversed(launch_lines) if x.strip()), "no output")
        return Outcome("failed", f"could not start the activation: {detail}")
    # Its output after the mark is the first follow's answer.
    return Following(ran=True, pending=(ok, first_answer) if ok else None)


def _follow(
    channel: Channel, run: ActivationRun, activation: Activation, following: Following
) -> Outcome | None:
    """Follow the run to a terminal state, confirming once it awaits confirmation; None then,
    else the outcome when contact was lost for good."""
    host, safety = channel.host, run.safety
    # At worst: the activation, the window, making it the boot default, and a rollback of
    # that (the old boot default, then the old system), each bounded by activation_timeout.
    deadline = time.monotonic() + 4 * safety.activation_timeout + safety.confirm_timeout + GRACE
    confirming_done = False
    lost_at: float | None = None
    while following.known not in TERMINAL:
        if time.monotonic() > deadline:
            return Outcome(
                "failed",
                f"lost contact for good (last state {following.known or 'unknown'}); the "
                "target rolls itself back unless it was confirmed: check it once it is reachable",
            )
        answer = following.pending or channel.run(
            follow_command(run, following.seen, following.known, FOLLOW_WAIT), FOLLOW_WAIT + 5
        )
        following.pending = None
        if answer is None or not answer[0]:
            if lost_at is None:
                lost_at = time.monotonic()
                guard = "it rolls back unless confirmed" if run.rolls_back else "no rollback"
                _say(host, f"lost contact; the activation carries on on the target ({guard})"
                     "; reconnecting", fg="yellow")  # fmt: skip
            gevent.sleep(1)
            continue
        if lost_at is not None:
            _say(host, f"reconnected after {time.monotonic() - lost_at:.1f}s")
            lost_at = None
        progress = parse_follow(answer[1])
        if not progress.status:
            # No state came back (an answer cut short): wait before asking again, never spin.
            gevent.sleep(1)
        for line in progress.lines:
            _say(host, f"activate: {line}")
        following.seen += len(progress.lines)
        following.status = progress.status or following.status
        following.known = progress.state
        following.ran = following.ran or following.known != "missing"
        if following.known == AWAITING and not confirming_done:
            confirming_done = True
            problem, following.pending = _check_and_confirm(
                channel, run, activation.checks, activation.systemd,
                lambda text, **style: _say(host, text, **style), following.seen,
            )  # fmt: skip
            following.note = problem or ""
    return None


def _finish(
    channel: Channel, run: ActivationRun, activation: Activation, following: Following
) -> Outcome:
    """The outcome of a run that reached a terminal state: without a rollback, the health
    checks run now (nothing would have undone a failure before)."""
    plan = activation.plan
    if following.known == "done" and not run.rolls_back and plan.action.confirmable:
        failed = run_checks(
            activation.checks, systemd=activation.systemd,
            run=channel.run, log=lambda m: _say(channel.host, m),
        )  # fmt: skip
        if failed:
            return Outcome("failed", f"{failed} (rollback is off: it stays on {plan.desired})")
    return judge(
        plan, following.status, following.note, seen=following.ran, rolls_back=run.rolls_back
    )


def pending_cause(holder: str | None, run: ActivationRun) -> str:
    """Why a launch gave up: another activation held the host's lock all the time it waited."""
    return (
        f"another activation is pending on the target ({holder or 'holder unknown'}); waited "
        f"{run.lock_wait}s for it to end. It ends on its own: confirmed by its controller, or "
        "rolled back once its confirmation time is up. Run again once it has ended (its state: "
        "/run/nixpush/<id>/status on the target)"
    )


def _check_and_confirm(
    channel: Channel,
    run: ActivationRun,
    checks: Sequence[HealthCheck],
    systemd: bool,
    say: Any,
    seen: int,
) -> tuple[str | None, tuple[bool, list[str]] | None]:
    """
    Health checks, then the confirmation over a new login: (None, the program's answer to it,
    when the login brought one back) once confirmed, else (the reason, None).
    """
    started = time.monotonic()
    window = run.safety.confirm_timeout
    problem = run_checks(
        checks, systemd=systemd, run=channel.run, log=lambda m: say(m),
        window=(started + window, time.monotonic),
    )  # fmt: skip
    took = time.monotonic() - started
    if problem is None and took >= window:
        problem = (
            f"the health checks took {took:.0f}s, outlasting the {window}s confirmation window"
        )
    if problem is None:
        last = "no answer"
        for attempt in range(CONFIRM_ATTEMPTS):
            if time.monotonic() - started > window:
                last = f"the {window}s confirmation window closed before another attempt"
                break
            if attempt:
                gevent.sleep(1)
            result = fresh_login_run(
                channel.host,
                confirm_and_follow_command(run, seen, FOLLOW_WAIT),
                sudo=channel.sudo,
                timeout=20 + FOLLOW_WAIT,
            )
            answer = None if result is None else split_at_mark(result[1], CONFIRMED_MARK)[1]
            if result is not None and answer is not None:
                say("confirmed over a new SSH connection")
                return None, ((True, answer) if result[0] else None)
            if result is None:
                last = "no new SSH connection could be made"
            else:
                text = [x.strip() for x in result[1] if x.strip()]
                last = text[-1] if text else "the confirmation was refused"
                if TOO_LATE in text:
                    return "the confirmation came too late", None
        problem = f"a new SSH login to confirm failed: {last}"
    say(f"not confirming: {problem}", fg="yellow")
    rejected = channel.run(reject_command(run, problem), 20)
    if rejected is None or not rejected[0]:
        say("could not tell the target; it rolls back when its confirmation time is up")
    return problem, None

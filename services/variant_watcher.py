"""The variant watcher: serves variants published while the app runs, without touching the app.

Why an application of its own per variant: Serve deploys an application as a whole. A
``serve.run`` of the app with one more engine gives every deployment a new code version (the
Python API draws a random one per deploy), and the ingress and tokenizer new init args, so
Serve would restart all of them; a Serve config with one more variant changes the app's args,
with the same effect. A new application leaves every other one alone. Its engine replicas
pull their queue from Redis, so nothing needs a handle to them, and it has no route
(``route_prefix=None``): neither HAProxy nor Serve's proxy sends clients to it, and a client
without ``application`` metadata still reaches the one routed app.

One replica; a thread reads the registry every ``live_variants.poll_s``:

- a published variant the app does not serve from its config, not running yet (or published
  again with another checksum): verify its artifacts, ``serve.run`` its engine application
  (returns once its replicas run), then write its served entry. The ingress accepts requests
  for it only from then on, so none wait for an engine that is still loading.
- a running variant that is no longer published: remove its served entry first (new requests
  get NOT_FOUND), then delete its application.

A variant that fails to deploy is logged and tried again only when it is published again.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from ray import serve

from services.config import AppConfig
from services.errors import TokenlineError
from services.queue.registry import VariantEntry, VariantRegistry, variant_model_config
from services.queue.served_variants import ServedVariant, ServedVariantsStore
from services.serve_logs import route_to_serve_logs

logger = logging.getLogger(__name__)


def variant_app_name(app_name: str, variant: str) -> str:
    """The Serve application that runs a variant's engines, named after the app that serves it."""
    return f"{app_name}.{variant}"


class VariantWatcher:
    def __init__(self, app_config: AppConfig) -> None:
        route_to_serve_logs()  # our records in this replica's Serve log
        self._config = app_config
        self._own = {model.name for model in app_config.models}  # deployed with the app itself
        prefix = app_config.queue.key_prefix
        self._registry = VariantRegistry(app_config.redis_url, prefix)
        self._served = ServedVariantsStore(app_config.redis_url, prefix)
        self._running: dict[str, str] = {}  # variant -> checksum of the version its engines run
        self._refused: dict[str, str] = {}  # variant -> checksum that failed to deploy
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="variant-watcher", daemon=True)
        self._thread.start()

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"variant watcher died: {self._error!r}")

    def running(self) -> dict[str, str]:
        """Variants whose engine applications this watcher runs, with their checksums."""
        return dict(self._running)

    def __del__(self) -> None:
        """Serve calls this on a graceful stop. The variant applications keep running: the
        next watcher (a rolling update of the app) takes them over."""
        if hasattr(self, "_stop"):
            self._stop.set()

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._take_over_running()
            while not self._stop.is_set():
                try:
                    self._poll()
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    logger.warning("registry unavailable; variants are looked at again later: %r", error)
                self._stop.wait(self._config.live_variants.poll_s)
        except BaseException as error:  # the health check reports it; Serve replaces the replica
            self._error = error
            logger.exception("variant watcher died")

    def _take_over_running(self) -> None:
        """Adopt variant applications that are still running (this replica replaces another):
        deploying them again would restart their engines. Entries without one are stale."""
        applications = serve.status().applications
        for name, served in self._served.all().items():
            application = applications.get(served.app_name)
            if application is not None and application.status == "RUNNING" and name not in self._own:
                self._running[name] = served.checksum
            else:
                self._served.unmark(name)

    def _poll(self) -> None:
        published = {entry.name: entry for entry in self._registry.all() if entry.name not in self._own}
        for name in [name for name in self._running if name not in published]:
            self._retire(name)
        for name, entry in published.items():
            if entry.checksum in (self._running.get(name), self._refused.get(name)):
                continue
            self._deploy(entry)

    def _deploy(self, entry: VariantEntry) -> None:
        # services.app binds this class into the app, so it is imported here, when first needed.
        from services.app import engine_deployment

        app_name = variant_app_name(self._config.app_name, entry.name)
        started = time.monotonic()
        try:
            model = variant_model_config(self._config, entry)  # verifies the artifacts' checksum
            serve.run(
                engine_deployment(self._config, model, entry.artifact_dir), name=app_name, route_prefix=None
            )
        except TokenlineError as error:  # artifacts that do not match the registry
            self._refuse(entry, error)
            return
        except RuntimeError as error:  # replicas that failed to start: do not leave them retrying
            self._served.unmark(entry.name)  # an older version it replaced goes too
            self._running.pop(entry.name, None)
            serve.delete(app_name, _blocking=False)
            self._refuse(entry, error)
            return
        self._running[entry.name] = entry.checksum
        self._served.mark_served(
            ServedVariant(
                name=entry.name,
                app_name=app_name,
                artifact_dir=entry.artifact_dir,
                checksum=entry.checksum,
                variant_of=entry.source_model,
                recipe=entry.recipe,
                max_model_len=model.engine.max_model_len,
                default_max_tokens=model.default_max_tokens,
                gate=dict(entry.gate),
            )
        )
        logger.info(
            "variant served",
            extra={
                "variant": entry.name,
                "application": app_name,
                "seconds": round(time.monotonic() - started, 1),
            },
        )

    def _refuse(self, entry: VariantEntry, error: Exception) -> None:
        self._refused[entry.name] = entry.checksum
        logger.error("variant not served", extra={"variant": entry.name, "error": str(error)})

    def _retire(self, name: str) -> None:
        self._served.unmark(name)  # first: no new requests for engines that are about to stop
        self._running.pop(name, None)
        serve.delete(variant_app_name(self._config.app_name, name), _blocking=False)
        logger.info("variant no longer served", extra={"variant": name})

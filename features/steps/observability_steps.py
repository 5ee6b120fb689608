"""Steps that run plans under OpenTelemetry SDK providers that keep everything in memory.

The providers are handed to the handler (never set globally), so no
scenario's telemetry reaches another's.
"""

from __future__ import annotations

from typing import Any

from behave import given, then
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cleveragents.resource.handlers.database import DatabaseResourceHandler


class _Providers:
    """SDK tracer and meter providers that keep all they get; shut down after the scenario."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def close(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()

    def plan_spans(self, plan_id: str) -> list[Any]:
        return [
            span
            for span in self.exporter.get_finished_spans()
            if span.name == "cleveragents.plan"
            and span.attributes.get("cleveragents.plan.id") == plan_id
        ]

    def sums(self, name: str) -> dict[frozenset[Any], Any]:
        """Return a counter's values by attribute set."""
        data = self.reader.get_metrics_data()
        found: dict[frozenset[Any], Any] = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found[frozenset(point.attributes.items())] = point.value
        return found

    def everything(self) -> str:
        spans = [span.to_json() for span in self.exporter.get_finished_spans()]
        data = self.reader.get_metrics_data()
        return "\n".join(spans) + (data.to_json() if data else "")


@given("a handler that records into in-memory OpenTelemetry providers")
def step_handler(context: Any) -> None:
    providers = _Providers()
    context.otel = providers
    context.handler = DatabaseResourceHandler(
        name="inventory-pool",
        tracer_provider=providers.tracer_provider,
        meter_provider=providers.meter_provider,
    )
    # Closed in reverse order: the handler first, then the providers.
    context.closables.append(providers)
    context.closables.append(context.handler)


@then('there is one plan span for "{plan_id}", with outcome "{outcome}" and {status}')
def step_plan_span(context: Any, plan_id: str, outcome: str, status: str) -> None:
    spans = context.otel.plan_spans(plan_id)
    assert len(spans) == 1, spans
    (span,) = spans
    assert span.attributes["cleveragents.plan.outcome"] == outcome, dict(span.attributes)
    expected = StatusCode.UNSET if status == "no error" else StatusCode.ERROR
    assert span.status.status_code is expected, span.status


@then('the plans counted are {count:d} "{outcome}"')
def step_plans_counted(context: Any, count: int, outcome: str) -> None:
    counted = context.otel.sums("cleveragents.plans")
    assert counted == {frozenset({("cleveragents.plan.outcome", outcome)}): count}, counted


@then("the checkpoints counted are {count:d}")
def step_checkpoints_counted(context: Any, count: int) -> None:
    counted = context.otel.sums("cleveragents.checkpoints")
    assert list(counted.values()) == [count], counted


@then('nothing recorded mentions "{value}", "{sql}" or the scenario\'s folder')
def step_nothing_recorded(context: Any, value: str, sql: str) -> None:
    text = context.otel.everything()
    assert text, "nothing was recorded at all"
    for secret in (value, sql, str(context.workdir)):
        assert secret not in text, f"{secret!r} was recorded"

"""Webhook delivery: routes, a durable retry queue, signed payloads, pooled HTTP.

Modules:
    settings: frozen configuration objects (built by ``gomail.config``).
    router: recipient -> route matching; also the recipient policy.
    jobs: the durable job store (one JSON file per job).
    signing: Standard Webhooks signatures.
    payload: the JSON (or multipart) body sent to a webhook.
    backoff: retry schedule and ``Retry-After`` parsing.
    addresses: the optional SSRF guard (private address ranges).
    client: the pooled treq ``HTTPClient``.
    service: the ``DeliveryService`` that sends due jobs.
    admin: queue operations for the CLI, safe while the daemon runs.
    testing: fakes for tests (synchronous thread pool, clock).
"""

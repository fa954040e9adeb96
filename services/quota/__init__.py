"""quota: decides grant or deny for each prompt and records every decision in Postgres.

events in   PromptSubmitted            (kiln.prompt.submitted.<user>), in batches
            WorkerHeartbeat            (kiln.fleet.telemetry.<worker>, plain NATS) → pressure.py
            RequestFailed              (kiln.outcome.<user>.<request>) → a refund
decide      policy.py                  pure: plan, usage, rate bucket, fleet pressure → decision
            plans.py / plans.toml      the plans and load-shedding rules
storage     log.py, chain.py           the append-only, hash-chained event log (Postgres)
events out  QuotaGranted / QuotaDenied (kiln.quota.decided.<user>.<request>)
            QuotaDenied                (kiln.outcome.<user>.<request>: a denial ends the request)
            relay.py                   publishes committed decisions a crash left unpublished
answers     kiln.quota.status.<user>   request/reply: today's QuotaStatus (used, limit, plan)
            kiln.quota.pressure        request/reply: the fleet pressure and why
metrics     metrics.py                 requests by outcome and plan, denials, fleet pressure
operators   accounts.py, audit.py      `kiln accounts …`, `kiln audit …`
"""

"""quota: decides grant or deny for each prompt and records every decision in Postgres.

events in   PromptSubmitted            (kiln.prompt.submitted.<user>)
decide      policy.py                  pure: plan, usage today, the submission → decision
storage     log.py                     the append-only quota event log (Postgres)
events out  QuotaGranted / QuotaDenied (kiln.quota.decided.<user>.<request>)
            QuotaDenied                (kiln.outcome.<user>.<request>: a denial ends the request)
"""

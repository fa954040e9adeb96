"""context (prompt-context): turns a granted prompt into one fully specified render job.

events in   QuotaGranted     (kiln.quota.decided.<user>.<request>; denials are skipped)
reads       the conversation's turns, and the outcome of an image being edited
decide      compose.py       pure: limits, blocklist, style, edit → the prompt drawn; what the
                             model cannot draw is refused (its card: KILN_MODEL/kiln-model.toml)
storage     KILN_CONVERSATIONS (JetStream): a TurnComposed per turn, one subject per conversation
events out  RenderRequested  (kiln.render.jobs.<tier>.<user>), or RequestFailed(stage="context")
answers     kiln.context.styles (request/reply): the style presets
config      context.toml     limits, blocklist, styles (KILN_CONTEXT_CONFIG)
"""

"""context (prompt-context): turns a granted prompt into one fully specified render job.

events in   QuotaGranted     (kiln.quota.decided.<user>.<request>; denials are skipped)
decide      compose.py       pure: the submission → RenderRequested
storage     none yet         (conversations, styles and edits come with their own issue)
events out  RenderRequested  (kiln.render.jobs.<tier>)
"""

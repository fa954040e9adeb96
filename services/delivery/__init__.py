"""delivery: turns a finished render into the request's outcome and serves the images.

events in   RenderCompleted / RenderFailed  (kiln.render.events.<user>.<request>)
decide      outcome.py                       pure: render event → outcome event
storage     reads the JetStream Object Store (bucket `kiln-images`)
events out  ImageDelivered / RequestFailed   (kiln.outcome.<user>.<request>)
http        http.py: GET /images/<user>/<request>.png, GET /healthz
"""

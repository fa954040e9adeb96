"""delivery: turns a finished render into the request's outcome and serves the images.

events in   RenderCompleted / RenderFailed  (kiln.render.events.<user>.<request>)
decide      outcome.py                       pure: render event → outcome event
storage     reads the JetStream Object Store (bucket `kiln-images`)
events out  ImageDelivered                   (kiln.delivery.ready.<user>.<request>)
            RequestFailed                    (kiln.request.failed.<user>.<request>)
http        http.py: GET /images/<request>.png, GET /healthz
"""

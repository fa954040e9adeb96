"""delivery: turns a finished render into the request's outcome and serves the images, the
share pages and the web playground.

events in   RenderCompleted / RenderFailed  (kiln.render.events.<user>.<request>)
decide      outcome.py                       pure: render event → outcome event, signed link
            links.py                         pure: signed, expiring links and sign-in cookies
storage     image_records.py                 each image's owner and prompt (KV `kiln-image-meta`);
                                             the PNGs are in the JetStream Object Store (`kiln-images`)
events out  ImageDelivered / RequestFailed   (kiln.outcome.<user>.<request>)
http        http.py                          images, share pages, the playground's API (accounts,
                                             a user's CLI credential), /healthz
            playground/                      the playground: one page of plain HTML, CSS and JS
metrics     metrics.py                       outcomes, end-to-end latency, HTTP requests by route
"""

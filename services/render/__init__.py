"""render: owns the GPUs (or the CPU); turns render jobs into stored PNGs.

events in   RenderRequested                (kiln.render.jobs.<tier>.<user>, a JetStream work
                                            queue taken user by user: queue.py)
decide      pipeline.py                    a diffusers pipeline from a local folder
storage     JetStream Object Store         bucket `kiln-images`, key `<user>/<request>.png`
events out  RenderProgress (plain NATS)    kiln.render.progress.<user>.<request>
            RenderCompleted / RenderFailed kiln.render.events.<user>.<request>
            WorkerHeartbeat (plain NATS)   kiln.fleet.telemetry.<worker>, every second (heartbeat.py)
"""

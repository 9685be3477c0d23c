"""From a camera or sensor to a result.

* :mod:`agent.pipeline.sources` - cameras, RTSP/HTTP streams, video files, image folders;
  :mod:`agent.pipeline.sensors` - sensor readings (file, FIFO, serial, stdin) cut into windows.
* :mod:`agent.pipeline.predictor` - a model and its card: preprocess, infer, postprocess.
* :mod:`agent.pipeline.loop` - the real-time frame loop (capture thread, inference worker,
  stage latency histograms from :mod:`agent.pipeline.histogram`, atomic model swap).

Nothing is imported here, so importing one part does not pull in the others (or OpenCV).
"""

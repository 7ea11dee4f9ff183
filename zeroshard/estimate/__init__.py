"""Memory and communication per rank before a run, from the real planners and engine.

- model_states.py: `estimate()`, per stage: params, grads, master, optimizer states and
  communication, each from the layout the optimizer would build;
- stage3.py: stage 3's gathered peak and bytes sent, from the real engine run on the meta
  device over an example input;
- replay.py: what the engine runs on without one: an input synthesized from the model's
  first layer, else a stand-in calling every module once in registration order (labelled).
"""

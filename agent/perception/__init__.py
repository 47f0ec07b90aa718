"""Perception: what the devices deliver, cut into what a turn can use. stage.py owns the camera (with the motion
detector subscribed to it) and the microphone thread that feeds the VAD segmenter (vad.py), each able to fail
without taking the daemon down; frames.py prepares the latest frame for the model; motion.py detects motion;
scene.py tells whether the view is still the one a prepared frame shows.
Results leave through callbacks: utterances (with wall-clock times) and motion events.
"""

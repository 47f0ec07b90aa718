"""Hardware inputs: the camera (latest-frame grabber) and the microphone (16 kHz mono int16 frames).

This package knows OpenCV and PortAudio, and nothing about models or MQTT.
"""

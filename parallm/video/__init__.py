"""Text-to-video: the pieces around the STDiT3 family (`parallm/models/stdit/`).

`rflow` (rectified-flow timesteps, noising and the Euler sampler with classifier-free guidance),
`text` (caption encoders and their cache), `autoencoder` (pixel space or an image VAE), `io`
(video files), `data` (video datasets) and `pipeline` (`VideoPipeline`: a trained model
directory -> videos). Nothing here imports the server.
"""

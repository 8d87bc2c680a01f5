"""The Visual-Genome Faster R-CNN (bottom-up attention) in torch + torchvision ops."""

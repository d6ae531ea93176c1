"""Offline jobs: batch scoring of CSV files, labelled datasets and evaluation."""

// Package logfile is an append-only file that can be reopened under the
// same name, so that logrotate can move it away and a signal makes the
// writer start a new one.
package logfile

import (
	"os"
	"sync"
)

// File appends to a path; Reopen starts writing to whatever file has that
// path now.
type File struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

// Open opens (creating, mode 0640: usage records name users) path for
// appending.
func Open(path string) (*File, error) {
	f, err := open(path)
	if err != nil {
		return nil, err
	}
	return &File{path: path, f: f}, nil
}

func open(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
}

// Write appends p in one write call, so that concurrent lines never
// interleave.
func (l *File) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Write(p)
}

// Reopen closes the current file and opens the path again; on error the
// old file stays in use.
func (l *File) Reopen() error {
	f, err := open(l.path)
	if err != nil {
		return err
	}
	l.mu.Lock()
	old := l.f
	l.f = f
	l.mu.Unlock()
	return old.Close()
}

// Close closes the file.
func (l *File) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}

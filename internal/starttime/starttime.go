// Package starttime records, as early as Go code can, when the process
// started, for rayvmm's boot timer.
//
// Go initializes packages in dependency order, picking the ready package
// with the lowest import path first: this one depends only on time, and
// its path sorts before most of the standard library's, so its variable is
// set a fraction of a millisecond after the runtime itself is up (far
// earlier than package main, which waits for every dependency). The Go
// runtime's own start-up before it is not counted; CPU time from getrusage
// covers the whole process.
package starttime

import "time"

// T is the process start time, as near as Go code sees it.
var T = time.Now()

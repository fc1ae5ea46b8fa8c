// Command clone-client clones an image through cowherd's public API from Go, as an operator's own client would:
// stubs generated from proto/ with Debian's protoc-gen-go and protoc-gen-go-grpc (see ../../build.sh), mutual TLS
// with the admin credential bundle, CloningService.CloneVirtualMachines, then google.longrunning.Operations
// (GetOperation, then WaitOperation until done), and the CloneVirtualMachinesResponse unpacked from the
// operation's Any. It is test/python/clone_client.py in Go: the same flags, JSON and exit statuses.
//
// Usage:
//
//	clone-client --image debian-12 --count 2 --name-template 'web-{index}' [--start]
//	             [--hosts kvm-01,kvm-02] [--credentials DIR] [--cloning HOST:PORT] [--timeout SECONDS]
//
// --credentials names the admin bundle directory (cert.pem, key.pem, ca.pem; default: the local fleet's,
// .state/fleet/credentials/admin, under $COWHERD_STATE_DIR when set); --cloning the cloning service (default
// $COWHERD_CLONING_ADDRESS or localhost:7444). Progress goes to stderr; stdout gets one JSON object:
//
//	{"operation": "operations/...", "source": "images/...", "clones": [{"index", "name", "virtualMachine",
//	 "host", "state", "started", "overlays", "error"}], "error": null}
//
// Exit status: 0 every clone is DONE; 1 the call or the operation failed (the JSON's "error" says why);
// 2 usage; 7 the operation finished but some clones FAILED (each has its "error").
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	cloningv1 "cowherd.dev/go/cowherd/cloning/v1"
	"google.golang.org/genproto/googleapis/longrunning"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// repositoryRoot is the checkout the binary was built from (build.sh sets it with -ldflags -X), for the local
// fleet's default credentials; the working directory when it was built otherwise.
var repositoryRoot = "."

// callTimeout bounds every single call, as the Python client's timeout=30 does.
const callTimeout = 30 * time.Second

type arguments struct {
	image, nameTemplate, hosts, credentials, cloning, serverName string
	count                                                        int
	start                                                        bool
	timeout                                                      float64
}

type rpcError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

type clone struct {
	Index          int32     `json:"index"`
	Name           string    `json:"name"`
	VirtualMachine string    `json:"virtualMachine"`
	Host           string    `json:"host"`
	State          string    `json:"state"`
	Started        bool      `json:"started"`
	Overlays       []string  `json:"overlays"`
	Error          *rpcError `json:"error"`
}

type result struct {
	Operation *string   `json:"operation"`
	Source    string    `json:"source"`
	Clones    []clone   `json:"clones"`
	Error     *rpcError `json:"error"`
}

func parseArguments() arguments {
	state := os.Getenv("COWHERD_STATE_DIR")
	if state == "" {
		state = filepath.Join(repositoryRoot, ".state")
	}
	cloning := os.Getenv("COWHERD_CLONING_ADDRESS")
	if cloning == "" {
		cloning = "localhost:7444"
	}
	var a arguments
	flag.StringVar(&a.image, "image", "", "the image id or images/{image} (required)")
	flag.IntVar(&a.count, "count", 1, "how many clones (1 to 1000)")
	flag.StringVar(&a.nameTemplate, "name-template", "", "e.g. 'web-{index}'; empty: '{source}-{random}'")
	flag.BoolVar(&a.start, "start", false, "start each clone once defined")
	flag.StringVar(&a.hosts, "hosts", "", "comma-separated host ids (STRATEGY_HOSTS); default: where the image is")
	flag.StringVar(&a.credentials, "credentials", filepath.Join(state, "fleet", "credentials", "admin"), "the admin bundle directory")
	flag.StringVar(&a.cloning, "cloning", cloning, "the cloning service, HOST:PORT")
	flag.StringVar(&a.serverName, "server-name", "", "TLS server name when the address is not in the certificate")
	flag.Float64Var(&a.timeout, "timeout", 300, "seconds to follow the operation")
	flag.Parse() // exits 2 on a bad flag, as argparse does
	if a.image == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "clone-client: --image is required and no positional arguments are taken")
		flag.Usage()
		os.Exit(2)
	}
	return a
}

// transportCredentials is mutual TLS with the bundle's cert.pem, key.pem and ca.pem.
func transportCredentials(directory, serverName string) (credentials.TransportCredentials, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(directory, "cert.pem"), filepath.Join(directory, "key.pem"))
	if err != nil {
		return nil, err
	}
	caPem, err := os.ReadFile(filepath.Join(directory, "ca.pem"))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", filepath.Join(directory, "ca.pem"))
	}
	// An empty ServerName makes grpc-go check the host part of the address, as grpcio does.
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}), nil
}

// codeName is the canonical name of a google.rpc.Status code, e.g. NOT_FOUND.
func codeName(value int32) string {
	return code.Code(value).String()
}

func statusError(s *rpcstatus.Status) *rpcError {
	if s == nil {
		return nil
	}
	return &rpcError{Code: codeName(s.GetCode()), Message: s.GetMessage()}
}

// newRequestID is a random (version 4) UUID.
func newRequestID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func printResult(r *result) {
	encoded, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(encoded))
}

var errFollowTimeout = errors.New("operation not done in time")

// follow starts the clone and waits for its operation; a gRPC error or errFollowTimeout (wrapped) on failure.
func follow(ctx context.Context, connection *grpc.ClientConn, request *cloningv1.CloneVirtualMachinesRequest, a arguments, r *result) (*longrunning.Operation, error) {
	service := cloningv1.NewCloningServiceClient(connection)
	operations := longrunning.NewOperationsClient(connection)
	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, callTimeout) }

	callContext, cancel := call()
	operation, err := service.CloneVirtualMachines(callContext, request)
	cancel()
	if err != nil {
		return nil, err
	}
	name := operation.GetName()
	r.Operation = &name
	fmt.Fprintf(os.Stderr, "clone-client: %s clones %s x%d\n", name, request.GetImage(), request.GetCount())
	callContext, cancel = call()
	operation, err = operations.GetOperation(callContext, &longrunning.GetOperationRequest{Name: name})
	cancel()
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Duration(a.timeout * float64(time.Second)))
	for !operation.GetDone() {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %s not done after %g s (it keeps running)", errFollowTimeout, name, a.timeout)
		}
		var metadata cloningv1.CloneVirtualMachinesMetadata
		if operation.GetMetadata().UnmarshalTo(&metadata) == nil {
			fmt.Fprintf(os.Stderr, "clone-client: %d done, %d failed of %d\n", metadata.GetDoneCount(), metadata.GetFailedCount(), metadata.GetTotalCount())
		}
		callContext, cancel = call()
		operation, err = operations.WaitOperation(callContext, &longrunning.WaitOperationRequest{Name: name, Timeout: durationpb.New(10 * time.Second)})
		cancel()
		if err != nil {
			return nil, err
		}
	}
	return operation, nil
}

func run() int {
	a := parseArguments()
	transport, err := transportCredentials(a.credentials, a.serverName)
	if err != nil {
		fmt.Fprintf(os.Stderr, "clone-client: cannot read the admin credentials: %v; pass --credentials <dir>\n", err)
		return 2
	}
	image := a.image
	if !strings.HasPrefix(image, "images/") {
		image = "images/" + image
	}
	r := &result{Source: image, Clones: []clone{}}

	placement := &cloningv1.Placement{Strategy: cloningv1.Placement_STRATEGY_WHERE_IMAGE_IS}
	if a.hosts != "" {
		placement = &cloningv1.Placement{Strategy: cloningv1.Placement_STRATEGY_HOSTS}
		for _, host := range strings.Split(a.hosts, ",") {
			placement.Hosts = append(placement.Hosts, "hosts/"+host)
		}
	}
	request := &cloningv1.CloneVirtualMachinesRequest{
		Source: &cloningv1.CloneVirtualMachinesRequest_Image{Image: image}, Placement: placement,
		Count: int32(a.count), NameTemplate: a.nameTemplate, Start: a.start, RequestId: newRequestID(),
	}

	// grpc.Dial connects lazily: an unreachable address shows as UNAVAILABLE on the first call, as with grpcio.
	connection, err := grpc.Dial(a.cloning, grpc.WithTransportCredentials(transport))
	if err != nil {
		r.Error = &rpcError{Code: "UNAVAILABLE", Message: err.Error()}
		printResult(r)
		fmt.Fprintf(os.Stderr, "clone-client: %v\n", err)
		return 1
	}
	defer connection.Close()

	operation, err := follow(context.Background(), connection, request, a, r)
	if errors.Is(err, errFollowTimeout) {
		r.Error = &rpcError{Code: "DEADLINE_EXCEEDED", Message: err.Error()}
		printResult(r)
		fmt.Fprintf(os.Stderr, "clone-client: %v\n", err)
		return 1
	}
	if err != nil {
		s := status.Convert(err)
		r.Error = &rpcError{Code: codeName(int32(s.Code())), Message: s.Message()}
		printResult(r)
		fmt.Fprintf(os.Stderr, "clone-client: %s: %s\n", r.Error.Code, r.Error.Message)
		return 1
	}

	if failure := operation.GetError(); failure != nil {
		r.Error = statusError(failure)
		printResult(r)
		fmt.Fprintf(os.Stderr, "clone-client: %s failed: %s\n", operation.GetName(), failure.GetMessage())
		return 1
	}
	var response cloningv1.CloneVirtualMachinesResponse
	if operation.GetResponse() == nil || operation.GetResponse().UnmarshalTo(&response) != nil {
		r.Error = &rpcError{Code: "INTERNAL", Message: "unexpected response type " + operation.GetResponse().GetTypeUrl()}
		printResult(r)
		return 1
	}
	failed := 0
	for _, c := range response.GetClones() {
		overlays := c.GetOverlays()
		if overlays == nil {
			overlays = []string{}
		}
		r.Clones = append(r.Clones, clone{
			Index: c.GetIndex(), Name: c.GetDomainName(), VirtualMachine: c.GetVirtualMachine(), Host: c.GetHost(),
			State: c.GetState().String(), Started: c.GetStarted(), Overlays: overlays, Error: statusError(c.GetError()),
		})
	}
	printResult(r)
	for _, c := range response.GetClones() {
		if c.GetState() != cloningv1.CloneResult_STATE_DONE {
			failed++
			fmt.Fprintf(os.Stderr, "clone-client: clone %d (%s) %s: %s\n", c.GetIndex(), c.GetDomainName(), c.GetState(), c.GetError().GetMessage())
		}
	}
	if failed > 0 {
		return 7
	}
	return 0
}

func main() {
	os.Exit(run())
}
